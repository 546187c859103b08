"""A periodic action of your own, named by `config.hooks = 'my_hooks:weight_norm@4'` (every 4 steps)."""

import jax
import numpy as np


def weight_norm(info):
  """Records the global L2 norm of the parameters in metrics.jsonl (`{'kind': 'hook', ...}`)."""
  params = jax.device_get(info.state.params)
  norm = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(params))))
  info.record(weight_norm=norm)

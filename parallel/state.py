"""The train state: what a checkpoint holds, and its initial (canonical, replicated) value."""

from typing import Any

import flax
import jax
import jax.numpy as jnp

from parallel.mesh import replicated


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the data position follows from `step`.

  `ema_params`: the exponential moving average of `params` when `config.ema_decay` > 0 (eval uses it),
  else `{}`.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any = flax.struct.field(default_factory=dict)


def initial_state(mesh, model, tx, image_shape, seed: int, ema: bool = False) -> TrainState:
  """Same params for any topology: initialised once from `seed`, replicated over the mesh."""

  def init():
    key = jax.random.PRNGKey(seed)
    init_key, state_key = jax.random.split(key)
    variables = model.init({'params': init_key}, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params), rng=state_key,
                      ema_params=jax.tree.map(jnp.copy, params) if ema else {})

  return jax.jit(init, out_shardings=replicated(mesh))()


_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'rng')


def checkpoint_tree(state: TrainState) -> dict:
  """What a checkpoint holds: the state's fields, `ema_params` only when EMA is on, so checkpoints of runs
  without EMA keep the layout of those written before EMA existed (and stay resumable)."""
  tree = {name: getattr(state, name) for name in _FIELDS}
  if jax.tree.leaves(state.ema_params):
    tree['ema_params'] = state.ema_params
  return tree


def from_checkpoint_tree(tree: dict) -> TrainState:
  return TrainState(**tree)

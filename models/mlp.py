"""A tiny MLP with BatchNorm: fast to compile, used by tests and as a second registry entry."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Flatten-Dense64-BN-ReLU-Dense(num_classes)."""
  num_classes: int = 10
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  hidden: int = 64

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x.astype(self.dtype).reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name if train else None,
                     dtype=self.dtype, param_dtype=jnp.float32)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)(nn.relu(x))
    return x.astype(jnp.float32)

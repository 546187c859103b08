"""A model of your own, named by `config.model = 'my_model:SmallNet'` (this file sits beside the config).

The trainer calls `SmallNet(num_classes=..., **config.model_kwargs)` and, because the class names them,
`dtype=` (from `config.dtype`) and `bn_axis_name=` (the mesh axis BatchNorm reduces over for global
statistics; None where none is needed).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class SmallNet(nn.Module):
  """Conv - BatchNorm - ReLU - global average pool - Dense."""
  num_classes: int
  width: int = 16
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.Conv(self.width, (3, 3), dtype=self.dtype)(images.astype(self.dtype))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name, dtype=self.dtype)(x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def small_net(num_classes: int, width: int = 16):
  """The same model from a function: `config.model = 'my_model:small_net'` (takes no dtype or axis name)."""
  return PlainBatchNormNet(num_classes=num_classes, width=width)


class PlainBatchNormNet(nn.Module):
  """A plain nn.BatchNorm without `axis_name`: global statistics under parallel_backend=jit only."""
  num_classes: int
  width: int = 16

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.Conv(self.width, (3, 3))(images)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(self.num_classes)(jnp.mean(nn.relu(x), axis=(1, 2)))

"""The seed CNN: Conv32-BN-ReLU-AvgPool2, Conv64-BN-ReLU-AvgPool2, Dense256-ReLU, Dense10."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class CNN(nn.Module):
  """Small NHWC convnet for 28x28 (or any HxW) images.

  `bn_axis_name` set to the mesh's data axis makes BatchNorm compute its batch statistics over the whole
  global batch (identical `batch_stats` on every device); `None` keeps them per device.
  """
  num_classes: int = 10
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x.astype(self.dtype)
    for features in (32, 64):
      x = nn.Conv(features, (3, 3), dtype=self.dtype, param_dtype=jnp.float32)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       axis_name=self.bn_axis_name if train else None, dtype=self.dtype, param_dtype=jnp.float32)(x)
      x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(256, dtype=self.dtype, param_dtype=jnp.float32)(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return x.astype(jnp.float32)

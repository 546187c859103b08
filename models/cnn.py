"""The seed CNN: Conv32-BN-ReLU-AvgPool2, Conv64-BN-ReLU-AvgPool2, Dense256-ReLU, Dense10."""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from models import norm


class CNN(nn.Module):
  """Small NHWC convnet for 28x28 (or any HxW) images.

  `bn_axis_name` set to the mesh's data axis makes BatchNorm compute its batch statistics over the whole
  global batch (identical `batch_stats` on every device); `None` keeps them per device.
  """
  num_classes: int = 10
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  conv: Callable = lax.conv_general_dilated  # models/conv.py: the CPU's faster kernel gradient
  bn_impl: str = 'flax'  # models/norm.py: 'fused' = BatchNorm-ReLU-pool with a hand-written backward pass

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x.astype(self.dtype)
    for features in (32, 64):
      # = nn.avg_pool(nn.relu(nn.BatchNorm(...)(nn.Conv(features, (3, 3))(x))), (2, 2), strides=(2, 2))
      x = norm.conv_batch_norm(self.bn_impl, features, (3, 3), conv=self.conv, dtype=self.dtype, relu=True,
                               pool=True, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                               axis_name=self.bn_axis_name if train else None, param_dtype=jnp.float32)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(256, dtype=self.dtype, param_dtype=jnp.float32)(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return x.astype(jnp.float32)

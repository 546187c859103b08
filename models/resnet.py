"""ResNet v1.5 (stride on the 3x3 conv, zero-initialised last BatchNorm scale in every residual block).

Two stems:
  - `imagenet`: 7x7 stride-2 conv + 3x3 stride-2 max-pool (224 px inputs);
  - `small`: one 3x3 stride-1 conv, no pool (CIFAR / Fashion-MNIST sized inputs);
  - `auto` picks `small` for images of 64 px and less, decided from the input's shape at trace time.

`width` is the first stage's channel count (64 for the standard nets); the stages double it. A narrow,
shallow variant (e.g. width 16, stages (1, 1, 1, 1)) keeps the tests and a 2-core CPU recipe fast.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

STEMS = ('auto', 'imagenet', 'small')
SMALL_STEM_MAX_PX = 64


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""
  features: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.features, (3, 3), self.strides)(x)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.features, (3, 3))(y))
    if x.shape != y.shape:
      x = self.norm()(self.conv(self.features, (1, 1), self.strides, name='proj')(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 x4 (ResNet-50)."""
  features: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.features, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.features, (3, 3), self.strides)(y)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.features * 4, (1, 1))(y))
    if x.shape != y.shape:
      x = self.norm()(self.conv(self.features * 4, (1, 1), self.strides, name='proj')(x))
    return nn.relu(x + y)


class GlobalAvgPool(nn.Module):
  """The mean over the spatial axes, as a module: `deterministic=True` runs variable-free modules per slice, and
  XLA's CPU rounds this reduction differently by the number of rows it sees."""

  @nn.compact
  def __call__(self, x):
    return jnp.mean(x, axis=(1, 2))


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  block: Any = BasicBlock
  width: int = 64
  stem: str = 'auto'
  num_classes: int = 10
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = lambda f, k, s=1, **kw: nn.Conv(f, k, (s, s), padding='SAME', use_bias=False, dtype=self.dtype,
                                           param_dtype=jnp.float32, **kw)
    norm = lambda **kw: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                     axis_name=self.bn_axis_name if train else None, dtype=self.dtype,
                                     param_dtype=jnp.float32, **kw)
    stem = self.stem if self.stem != 'auto' else ('small' if max(x.shape[1:3]) <= SMALL_STEM_MAX_PX else 'imagenet')
    x = x.astype(self.dtype)
    if stem == 'imagenet':
      x = nn.relu(norm()(conv(self.width, (7, 7), 2, name='stem_conv')(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    else:
      x = nn.relu(norm()(conv(self.width, (3, 3), name='stem_conv')(x)))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = self.block(self.width * 2 ** i, 2 if i > 0 and j == 0 else 1, conv, norm)(x)
    x = GlobalAvgPool()(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return x.astype(jnp.float32)


# name -> (stage sizes, block)
DEPTHS = {
    'resnet18': ((2, 2, 2, 2), BasicBlock),
    'resnet34': ((3, 4, 6, 3), BasicBlock),
    'resnet50': ((3, 4, 6, 3), Bottleneck),
}


def parse_stages(text: str) -> tuple:
  """'2,2,2,2' -> (2, 2, 2, 2); ValueError unless every entry is a whole number >= 1."""
  stages = tuple(int(s) for s in str(text).split(','))
  if not stages or min(stages) < 1:
    raise ValueError(text)
  return stages


def build(name: str, config, **kw) -> ResNet:
  """Reads `config.stem`, `config.resnet_width`, `config.resnet_stages` ('' = the standard depth of `name`);
  trainer.config_check has validated them."""
  stages, block = DEPTHS[name]
  if config.resnet_stages:
    stages = parse_stages(config.resnet_stages)
  return ResNet(stage_sizes=stages, block=block, width=config.resnet_width, stem=config.stem, **kw)

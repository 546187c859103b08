"""Model registry: `config.model` names one of `MODELS`, `config.dtype` one of `DTYPES`.

Adding a model is one entry here plus its module. An entry is a builder `(config, **kw) -> nn.Module`; `kw` is
`num_classes`, `dtype` (compute dtype; params stay float32) and `bn_axis_name` (the mesh axis BatchNorm
reduces over, or None). A builder reads any model-specific config fields it needs. A `MODULE:ATTR` value names
a model outside the project instead (`models/external.py`).
"""

import functools
from typing import Callable, Dict

import flax.linen as nn
import jax.numpy as jnp

import plugins
from models import cnn, conv, external, mlp, norm, resnet, vit

MODELS: Dict[str, Callable[..., nn.Module]] = {
    'cnn': lambda config, **kw: cnn.CNN(conv=conv.conv_for(config.conv_impl), bn_impl=config.bn_impl, **kw),
    'mlp': lambda config, **kw: mlp.MLP(**kw),
    **{name: functools.partial(resnet.build, name) for name in resnet.DEPTHS},
    **{name: functools.partial(vit.build, name) for name in vit.SIZES},
}

CONV_IMPLS = conv.IMPLS  # config.conv_impl: 'auto' = the matmul kernel gradient on CPU, XLA's elsewhere
BN_IMPLS = norm.IMPLS  # config.bn_impl: 'auto' = the hand-differentiated BatchNorm on CPU, flax's elsewhere

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_model(config, *, num_classes: int, bn_axis_name=None) -> nn.Module:
  """Builds `config.model` in `config.dtype`."""
  if plugins.is_path(config.model):
    return external.build(config, num_classes=num_classes, dtype=DTYPES[config.dtype], bn_axis_name=bn_axis_name)
  return MODELS[config.model](config, num_classes=num_classes, dtype=DTYPES[config.dtype], bn_axis_name=bn_axis_name)

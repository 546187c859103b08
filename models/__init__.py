"""Model registry: `config.model` names one of `MODELS`, `config.dtype` one of `DTYPES`.

Adding a model is one entry here plus its module. An entry is a builder `(config, **kw) -> nn.Module`; `kw` is
`num_classes`, `dtype` (compute dtype; params stay float32) and `bn_axis_name` (the mesh axis BatchNorm
reduces over, or None). A builder reads any model-specific config fields it needs. A `MODULE:ATTR` value names
a model outside the project instead (`models/external.py`).

The models are plain flax linen. `create_model` hands them to `cpu_kernels.plug`, which runs their convolutions
and BatchNorms with hand-written CPU kernels on the CPU platform (`config.cpu_kernels`); the models know
nothing of it.
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

import cpu_kernels
import plugins
from models import cnn, external, mlp, resnet, vit

MODELS: dict[str, Callable[..., nn.Module]] = {
    'cnn': lambda config, **kw: cnn.CNN(**kw),
    'mlp': lambda config, **kw: mlp.MLP(**kw),
    **{name: functools.partial(resnet.build, name) for name in resnet.DEPTHS},
    **{name: functools.partial(vit.build, name) for name in vit.SIZES},
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_model(config, *, num_classes: int, bn_axis_name=None):
  """Builds `config.model` in `config.dtype`, with `config.cpu_kernels` applied (`model.init` and `model.apply`
  as flax's; the flax Module itself is `model` or, with the kernels plugged in, `model.model`)."""
  build = external.build if plugins.is_path(config.model) else MODELS[config.model]
  model = build(config, num_classes=num_classes, dtype=DTYPES[config.dtype], bn_axis_name=bn_axis_name)
  return cpu_kernels.plug(model, config.cpu_kernels)

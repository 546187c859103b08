"""Model registry: `config.model` names one of `MODELS`; add a model by adding an entry."""

from typing import Callable, Dict

import flax.linen as nn
import jax.numpy as jnp

from errors import UserError
from models import cnn, mlp

MODELS: Dict[str, Callable[..., nn.Module]] = {
    'cnn': cnn.CNN,
    'mlp': mlp.MLP,
}


def create_model(name: str, *, num_classes: int, dtype=jnp.float32, bn_axis_name=None) -> nn.Module:
  """Builds `config.model`; params stay float32, `dtype` is the compute dtype."""
  if name not in MODELS:
    raise UserError(f'unknown model {name!r}: set --config.model to one of {sorted(MODELS)}')
  return MODELS[name](num_classes=num_classes, dtype=dtype, bn_axis_name=bn_axis_name)

"""Models named by import path: `config.model = 'MODULE:ATTR'`, built with `config.model_kwargs`.

`ATTR` is a `flax.linen.Module` class, or a function returning a Module instance. It is called as
`ATTR(num_classes=..., **model_kwargs)`, plus the trainer's own keywords where its signature names them:
  - `dtype`: the compute dtype of `config.dtype` (params should stay float32);
  - `bn_axis_name` (or else `axis_name`): the mesh axis BatchNorm must reduce over for global statistics
    under the per-device backends (shard_map, pmap; None under jit and with `bn_mode=local`).
The Module is applied as `model.apply(variables, images, train=...)` and returns logits [batch, num_classes].
"""

import inspect

import flax.linen as nn

import plugins
from errors import UserError, first_line, setting

TRAINER_KEYWORDS = ('num_classes', 'dtype', 'bn_axis_name', 'axis_name')


def _target(config):
  return plugins.resolve(config.model, 'model')


def _signature(target):
  """The keywords `target` takes, and whether it takes **kwargs (Module classes: their dataclass fields)."""
  names, var = plugins.keywords(target)
  return tuple(n for n in names if n != 'parent'), var


def check(config) -> None:
  """Import errors, a target that is neither a Module class nor a function, a missing `num_classes` or
  `train`, and `model_kwargs` the target does not take: one `UserError` each, before any device starts."""
  target = _target(config)
  spec = config.model
  if isinstance(target, type) and not issubclass(target, nn.Module) or not callable(target):
    raise UserError(f'{setting("model")}={spec!r} is of type {type(target).__name__}, not a flax.linen Module '
                    'class or a function returning one: name one of those')
  names, var = _signature(target)
  if 'num_classes' not in names and not var:
    raise UserError(f'{setting("model")}={spec!r} takes no num_classes keyword: add `num_classes: int` (the '
                    'trainer passes the dataset\'s class count)')
  kwargs = dict(config.model_kwargs)
  for key in kwargs:
    if key in TRAINER_KEYWORDS:
      raise UserError(f'{setting("model_kwargs." + key)} is set by the trainer (num_classes from the data, dtype '
                      f'from {setting("dtype")}, the BatchNorm axis from {setting("bn_mode")}): remove it')
    if key not in names and not var:
      takes = [n for n in names if n not in TRAINER_KEYWORDS and n != 'name']
      near = plugins.nearest(key, takes)
      hint = f'did you mean {setting("model_kwargs." + near)}? ' if near else ''
      raise UserError(f'{setting("model_kwargs." + key)}: {spec} takes no keyword {key!r}: {hint}its keywords '
                      f'are {", ".join(takes) or "(none)"}')
  if isinstance(target, type):
    _check_call(spec, target)


def _check_call(spec: str, cls) -> None:
  names, var = plugins.keywords(cls.__call__)
  if 'train' not in names and not var:
    raise UserError(f'{setting("model")}={spec!r}: {cls.__name__}.__call__ takes no `train` argument: define '
                    '`__call__(self, images, train: bool)` (True in training, False in eval)')


def takes_axis_name(config) -> bool:
  """Whether the target takes a BatchNorm axis keyword (`bn_axis_name` or `axis_name`)."""
  names, _ = _signature(_target(config))
  return 'bn_axis_name' in names or 'axis_name' in names


def build(config, *, num_classes: int, dtype, bn_axis_name) -> nn.Module:
  """The Module `config.model` names, called with `num_classes`, `model_kwargs` and the trainer keywords its
  signature names (a **kwargs catch-all gets none of `dtype` and the axis: they are passed only when named)."""
  target = _target(config)
  names, _ = _signature(target)
  kwargs = dict(config.model_kwargs, num_classes=num_classes)
  if 'dtype' in names:
    kwargs['dtype'] = dtype
  if 'bn_axis_name' in names:
    kwargs['bn_axis_name'] = bn_axis_name
  elif 'axis_name' in names:
    kwargs['axis_name'] = bn_axis_name
  try:
    model = target(**kwargs)
  except (TypeError, ValueError) as e:
    raise UserError(f'{setting("model")}={config.model!r} failed to build with {sorted(kwargs)} '
                    f'({e.__class__.__name__}: {first_line(e)}): fix {setting("model_kwargs")} or the model') from None
  if not isinstance(model, nn.Module):
    raise UserError(f'{setting("model")}={config.model!r} returned type {type(model).__name__}, not a flax.linen '
                    'Module: return a Module instance (e.g. `return Net(num_classes=num_classes)`)')
  if not inspect.isclass(target):
    _check_call(config.model, type(model))
  return model

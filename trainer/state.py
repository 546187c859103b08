"""Optimizer, learning-rate schedule and the initial (canonical, replicated) train state."""

import jax
import jax.numpy as jnp
import optax

from errors import UserError
from models import create_model
from parallel.mesh import AXIS, replicated
from parallel.steps import TrainState

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'warmup_cosine')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise UserError(f'unknown dtype {name!r}: set --config.dtype to one of {sorted(DTYPES)}')
  return DTYPES[name]


def make_models(config, num_classes: int):
  """(train model, eval model): identical except that only the train one reduces BN over the mesh."""
  dtype = compute_dtype(config.dtype)
  bn_axis = AXIS if config.bn_mode == 'global' else None
  return (create_model(config.model, num_classes=num_classes, dtype=dtype, bn_axis_name=bn_axis),
          create_model(config.model, num_classes=num_classes, dtype=dtype, bn_axis_name=None))


def make_schedule(config, total_steps: int):
  lr = config.learning_rate
  if config.lr_schedule == 'constant':
    return optax.constant_schedule(lr)
  if config.lr_schedule == 'cosine':
    return optax.cosine_decay_schedule(lr, max(total_steps, 1))
  if config.lr_schedule == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, config.warmup_steps, max(total_steps, config.warmup_steps + 1))
  raise UserError(f'unknown lr_schedule {config.lr_schedule!r}: set --config.lr_schedule to one of {SCHEDULES}')


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  schedule = make_schedule(config, total_steps)
  if config.optimizer == 'sgd':
    return optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
  if config.optimizer == 'adam':
    return optax.adam(schedule)
  if config.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  raise UserError(f'unknown optimizer {config.optimizer!r}: set --config.optimizer to one of {OPTIMIZERS}')


def initial_state(mesh, model, tx, image_shape, seed: int) -> TrainState:
  """Same params for any topology: initialised once from `seed`, replicated over the mesh."""

  def init():
    key = jax.random.PRNGKey(seed)
    init_key, state_key = jax.random.split(key)
    variables = model.init({'params': init_key}, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params), rng=state_key)

  return jax.jit(init, out_shardings=replicated(mesh))()

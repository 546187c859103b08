"""Optimizers and learning-rate schedules: registries that `config.optimizer` / `config.lr_schedule` name.

Adding one is one entry here; `trainer.config_check` and its error messages list the registry's keys.
"""

from typing import Callable, Dict

import optax

# name -> (config, total_steps) -> schedule
SCHEDULES: Dict[str, Callable] = {
    'constant': lambda c, total: optax.constant_schedule(c.learning_rate),
    'cosine': lambda c, total: optax.cosine_decay_schedule(c.learning_rate, max(total, 1)),
    'warmup_cosine': lambda c, total: optax.warmup_cosine_decay_schedule(
        0.0, c.learning_rate, c.warmup_steps, max(total, c.warmup_steps + 1)),
}

# name -> (config, schedule) -> optax.GradientTransformation
OPTIMIZERS: Dict[str, Callable] = {
    'sgd': lambda c, lr: optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov),
    'adam': lambda c, lr: optax.adam(lr),
    'adamw': lambda c, lr: optax.adamw(lr, weight_decay=c.weight_decay),
}


def make_schedule(config, total_steps: int):
  return SCHEDULES[config.lr_schedule](config, total_steps)


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  return OPTIMIZERS[config.optimizer](config, make_schedule(config, total_steps))

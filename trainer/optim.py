"""Optimizers and learning-rate schedules: registries that `config.optimizer` / `config.lr_schedule` name.

Adding one is one entry here; `trainer.config_check` and its error messages list the registry's keys.
Weight decay (`config.weight_decay`) touches kernels only (`decay_mask`): never biases, BatchNorm/LayerNorm
scales and offsets, or ViT position embeddings, as in the Flax ImageNet example and big_vision.
"""

from typing import Callable, Dict

import jax
import optax

# name -> (config, peak_lr, total_steps) -> schedule
SCHEDULES: Dict[str, Callable] = {
    'constant': lambda c, lr, total: optax.constant_schedule(lr),
    'cosine': lambda c, lr, total: optax.cosine_decay_schedule(lr, max(total, 1)),
    'warmup_cosine': lambda c, lr, total: optax.warmup_cosine_decay_schedule(
        0.0, lr, c.warmup_steps, max(total, c.warmup_steps + 1)),
}


def decay_mask(params):
  """True for the leaves weight decay applies to: those named `kernel`."""
  return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def _sgd(c, lr):
  sgd = optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov)
  if not c.weight_decay:
    return sgd
  # Coupled L2, the classic ResNet recipe: the decay term joins the gradient before momentum.
  return optax.chain(optax.add_decayed_weights(c.weight_decay, mask=decay_mask), sgd)


# name -> (config, schedule) -> optax.GradientTransformation
OPTIMIZERS: Dict[str, Callable] = {
    'sgd': _sgd,
    'adam': lambda c, lr: optax.adam(lr),
    'adamw': lambda c, lr: optax.adamw(lr, weight_decay=c.weight_decay, mask=decay_mask),
}


def peak_learning_rate(config) -> float:
  """`learning_rate`, or with `lr_per_256` that rate per 256 images scaled to the global batch."""
  return config.learning_rate * config.batch_size / 256 if config.lr_per_256 else config.learning_rate


def make_schedule(config, total_steps: int):
  return SCHEDULES[config.lr_schedule](config, peak_learning_rate(config), total_steps)


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  return OPTIMIZERS[config.optimizer](config, make_schedule(config, total_steps))

"""Optimizers and learning-rate schedules: registries that `config.optimizer` / `config.lr_schedule` name.

Adding one is one entry here; `trainer.config_check` and its error messages list the registry's keys.
Weight decay (`config.weight_decay`) touches kernels only (`decay_mask`): never biases, BatchNorm/LayerNorm
scales and offsets, or ViT position embeddings, as in the Flax ImageNet example and big_vision.
"""

import json
import types
from collections.abc import Callable

import jax
import optax
from absl import logging

import storage
from errors import UserError

# name -> (config, peak_lr, total_steps) -> schedule
SCHEDULES: dict[str, Callable] = {
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
OPTIMIZERS: dict[str, Callable] = {
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


# The fields that decide the schedule's values: a resume that changes one moves the learning rate at the resume step.
SCHEDULE_FIELDS = ('lr_schedule', 'learning_rate', 'lr_per_256', 'batch_size', 'warmup_steps', 'num_epochs',
                   'num_train_steps')


def saved_schedule_config(workdir: str) -> dict | None:
  """The schedule fields of WORKDIR/config.json (the run being resumed), or None when it cannot be read. Read
  before this run records its own config there."""
  try:
    saved = json.loads(storage.read_text(storage.join(workdir, 'config.json')))
  except (OSError, ValueError, UserError):
    return None
  return {k: saved[k] for k in SCHEDULE_FIELDS if k in saved} if isinstance(saved, dict) else None


def log_schedule_change(saved: dict | None, config, steps_per_epoch: int, total_steps: int, step: int) -> None:
  """On a resume at `step`: when the schedule differs from the saved run's (more epochs, more steps, another
  rate), one line with the learning rate at `step` under both: a longer cosine run climbs back up from ~0."""
  if not saved:
    return
  old = types.SimpleNamespace(**{k: config[k] for k in SCHEDULE_FIELDS})
  try:
    vars(old).update(saved)
    old_total = old.num_train_steps if old.num_train_steps > 0 else old.num_epochs * steps_per_epoch
    before = float(make_schedule(old, old_total)(step))
  except (KeyError, TypeError, ValueError):  # A schedule or value this version does not know: nothing to compare.
    return
  after = float(make_schedule(config, total_steps)(step))
  if old_total == total_steps and abs(after - before) <= 1e-6 * max(abs(before), 1e-30):
    return
  log = logging.warning if after > before * (1 + 1e-6) else logging.info
  log('Schedule changed on resume: %d -> %d total steps (%s); the learning rate at step %d goes from %.4g '
      '(saved schedule) to %.4g', old_total, total_steps, config.lr_schedule, step, before, after)

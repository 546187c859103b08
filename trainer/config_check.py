"""Validates a config before any work starts: every bad value is one `UserError` that names the fix."""

import math

import cpu_kernels
import plugins
from cpu_kernels.malloc import HUGE_PAGES
from errors import UserError, setting
from input_pipeline import augment
from input_pipeline.augment import AUGMENTATIONS
from input_pipeline.sources import SOURCES
from models import DTYPES, MODELS, external, resnet
from parallel.sharding import SHARD_PARAMS
from parallel.steps import BACKENDS, BN_MODES
from trainer import hooks
from trainer.optim import OPTIMIZERS, SCHEDULES

# Config field -> the registry whose keys are its allowed values (the registries are the only truth).
_CHOICES = {
    'data_source': SOURCES, 'augment': AUGMENTATIONS, 'model': MODELS, 'optimizer': OPTIMIZERS,
    'lr_schedule': SCHEDULES,
    'parallel_backend': BACKENDS, 'bn_mode': BN_MODES, 'dtype': DTYPES, 'stem': resnet.STEMS,
    'cpu_kernels': cpu_kernels.SETTINGS, 'huge_pages': HUGE_PAGES, 'shard_params': SHARD_PARAMS,
}
_POSITIVE_INTS = ('batch_size', 'eval_batch_size', 'num_epochs', 'log_every_steps', 'checkpoint_every_steps',
                  'keep_checkpoints', 'max_steps_in_flight', 'prefetch_batches', 'steps_per_dispatch', 'resnet_width',
                  'patch_size', 'grad_accum_steps', 'synthetic_train_examples', 'synthetic_eval_examples')
_NON_NEGATIVE_INTS = ('vit_depth', 'profile_steps', 'fsdp_min_bytes')


def _fail(key, value, rule):
  raise UserError(f'{setting(key)}={value!r} is invalid: {rule}')


# Fields that also take code by import path ('MODULE:ATTR'), checked by importing it.
_PLUGGABLE = {'model': external.check, 'augment': lambda config: augment.create(config.augment)}


def validate(config) -> None:
  for key, choices in _CHOICES.items():
    if key in _PLUGGABLE and plugins.is_path(config[key]):
      _PLUGGABLE[key](config)
    elif config[key] not in choices:
      extra = ", or MODULE:ATTR for your own (docs/extending.md)" if key in _PLUGGABLE else ''
      _fail(key, config[key], f'use one of {", ".join(choices)}{extra}')
  if config.model_kwargs and not plugins.is_path(config.model):
    _fail('model_kwargs', config.model_kwargs.to_dict(), f'keyword arguments are for MODULE:ATTR models '
          f'only; the zoo\'s {config.model!r} reads its own fields (resnet_width, patch_size, ...): remove them')
  if not isinstance(config.hooks, str):
    _fail('hooks', config.hooks, "give a string 'MODULE:ATTR@EVERY,...', or '' for none")
  hooks.resolve(config.hooks)
  for key in _POSITIVE_INTS:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      _fail(key, value, 'must be a whole number >= 1')
  for key in _NON_NEGATIVE_INTS:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      _fail(key, value, 'must be a whole number >= 0 (0 = off / the default)')
  if not isinstance(config.allow_data_change, bool):
    _fail('allow_data_change', config.allow_data_change, 'must be True or False')
  for key in ('num_train_steps', 'eval_every_steps'):
    if not isinstance(config[key], int) or (config[key] < 1 and config[key] != -1):
      _fail(key, config[key], 'must be >= 1, or -1 for the default')
  _check_jit(config)
  _check_deterministic(config)
  lr = config.learning_rate
  if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    _fail('learning_rate', lr, 'must be a finite number > 0')
  lease = config.get('workdir_lease_s', 60)
  if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not math.isfinite(lease) or lease <= 0:
    _fail('workdir_lease_s', lease, 'must be a number of seconds > 0')
  if not 0 <= config.momentum < 1:
    _fail('momentum', config.momentum, 'must be in [0, 1)')
  if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
    _fail('weight_decay', config.weight_decay, 'must be a finite number >= 0')
  if not 0 <= config.label_smoothing < 1:
    _fail('label_smoothing', config.label_smoothing, 'must be in [0, 1) (0 = plain cross-entropy)')
  if not 0 <= config.ema_decay < 1:
    _fail('ema_decay', config.ema_decay, 'must be in [0, 1) (0 = no EMA; typical: 0.999 or 0.9999)')
  if config.resnet_stages:
    try:
      resnet.parse_stages(config.resnet_stages)
    except ValueError:
      _fail('resnet_stages', config.resnet_stages, "give blocks per stage as a comma list of whole numbers >= 1, "
            "e.g. '2,2,2,2', or '' for the model's standard depth")
  accum = config.grad_accum_steps
  if isinstance(accum, int) and accum > 1 and config.batch_size % accum:
    _fail('batch_size', config.batch_size, f'must divide into {setting("grad_accum_steps")}={accum} '
          f'micro-batches: use a multiple of {accum}')
  if config.warmup_steps < 0:
    _fail('warmup_steps', config.warmup_steps, 'must be >= 0')
  seed = config.seed
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
    _fail('seed', seed, 'must be a whole number in [0, 2**31)')
  if not config.dataset or not isinstance(config.dataset, str):
    _fail('dataset', config.dataset, 'name a dataset, e.g. fashion_mnist')
  for key in ('image_size', 'data_threads'):
    if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 0:
      _fail(key, config[key], 'must be a whole number >= 0 (0: the default)')
  if not isinstance(config.eval_split, str) or '/' in config.eval_split:
    _fail('eval_split', config.eval_split, "name a split (e.g. test, validation), or '' for the default")
  if config.normalize:
    for key in ('mean', 'std'):
      values = config[key]
      if not isinstance(values, (tuple, list)) or not values or \
          not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        _fail(key, values, 'must be a tuple of finite numbers, e.g. (0.5,) or (0.485, 0.456, 0.406)')
    if min(config.std) <= 0:
      _fail('std', config.std, 'every value must be > 0')


def _check_jit(config) -> None:
  """Per-device BatchNorm needs a per-device body; FSDP needs the partitioner (the jit backend)."""
  if config.parallel_backend == 'jit' and config.bn_mode == 'local':
    _fail('bn_mode', 'local', f'needs per-device steps: use {setting("parallel_backend")}=shard_map or pmap, or '
          'bn_mode=global with jit (statistics of the whole global batch)')
  if config.shard_params != 'none' and config.parallel_backend != 'jit':
    _fail('shard_params', config.shard_params, f'needs {setting("parallel_backend")}=jit (shard_map and pmap keep '
          'the state replicated): add --config.parallel_backend=jit, or use shard_params=none')


def _check_deterministic(config) -> None:
  """Fixed-order training: V a power of two that the batches split into, and only the pieces it can order."""
  v = config.virtual_shards
  if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
    _fail('virtual_shards', v, 'must be a power of two >= 1 (e.g. 8: allows 1, 2, 4 or 8 devices)')
  if not isinstance(config.deterministic, bool):
    _fail('deterministic', config.deterministic, 'must be True or False')
  if not config.deterministic:
    return
  need = f'with {setting("deterministic")}=True'
  accum = config.grad_accum_steps if isinstance(config.grad_accum_steps, int) else 1
  for key, parts in (('batch_size', v * accum), ('eval_batch_size', v)):
    if config[key] % parts:
      split = f'{v} slices x {accum} micro-batches' if key == 'batch_size' and accum > 1 else f'{v} slices'
      _fail(key, config[key], f'must split into {setting("virtual_shards")}={v} equal slices {need} ({split}): '
            f'use a multiple of {parts}, or another virtual_shards')
  if config.bn_mode != 'global':
    _fail('bn_mode', config.bn_mode, f'per-device statistics depend on the device count: use bn_mode=global '
          f'{need}')

"""`data_source=synthetic`: images and labels generated on the devices, for benchmarks and checks.

No files, no tf.data, no TensorFlow: the host sends each step's global example indices (the usual
`order.epoch_batches` / `order.eval_batches`, so the topology-invariant order and the exact eval hold), and
one jitted program turns them into pixels where the batch lives. Example `i` of a split is a pure function
of (seed, split, i): its label is drawn from `key(seed, split, i)`, and its image is half noise from that
key and half a fixed pattern of its class (from `key(seed, label)`), pixels in [0, 1). So the labels can be
learned (the loss falls, the accuracy rises: an end-to-end check), and the same bits come out on any
device kind, device count or process count (threefry is counter-based and sharding-invariant).

The image shape and class count are those of `config.dataset` (`base.DATASETS`); `image_size` sets the
size. `augment` and `normalize` do not apply: the pixels are made at their final size.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from errors import UserError, setting
from input_pipeline import base

_SPLIT_IDS = {'train': 0, 'eval': 1}
_PATTERN_STREAM = 2  # fold_in tag of the class patterns, apart from the splits' streams.


def examples(seed: int, split: str, indices, shape: tuple[int, int, int], num_classes: int):
  """(float32 images indices.shape + shape in [0, 1), int32 labels indices.shape) of global `indices`."""
  base = jax.random.PRNGKey(seed)
  split_key = jax.random.fold_in(base, _SPLIT_IDS[split])
  pattern_key = jax.random.fold_in(base, _PATTERN_STREAM)

  def one(i):
    label_key, noise_key = jax.random.split(jax.random.fold_in(split_key, i))
    label = jax.random.randint(label_key, (), 0, num_classes, jnp.int32)
    pattern = jax.random.uniform(jax.random.fold_in(pattern_key, label), shape, jnp.float32)
    return 0.5 * jax.random.uniform(noise_key, shape, jnp.float32) + 0.5 * pattern, label

  for _ in range(indices.ndim):  # One vmap per leading axis: no reshape of a sharded axis.
    one = jax.vmap(one)
  return one(indices)


class SyntheticSource(base.Source):
  """Generated examples with a built-in dataset's shape and classes; batches are made on the devices."""
  on_device = True  # `trainer.job` feeds it indices and calls `generate`, not tf.data.

  def __init__(self, dataset: str, image_shape, num_classes: int, counts: dict, seed: int):
    self.dataset, self.image_shape, self.num_classes, self.seed = dataset, tuple(image_shape), num_classes, seed
    self.channels = self.image_shape[-1]
    self._counts = dict(counts)
    self.description = f'synthetic (generated with the shape and classes of {dataset})'
    self._programs = {}

  def num_examples(self, split: str) -> int:
    return self._counts[split]

  def reader(self, split: str):
    raise TypeError('synthetic examples are generated on the devices (`generate`), not read by tf.data')

  def content_digest(self) -> str:
    return base.digest_of(['synthetic-v1', str(self.seed), str(self.image_shape), str(self.num_classes)])

  def generate(self, split: str, placed: dict) -> dict:
    """`placed['index']`: a device array of global example indices, in any layout (a step's batch, k steps
    stacked, pmap's device axis). Returns `placed` with `image` and `label` added in that same layout (the
    program is row-local: no collective, no transfer)."""
    index = placed['index']
    key = (split, index.shape, index.sharding)
    if key not in self._programs:
      fn = functools.partial(examples, self.seed, split, shape=self.image_shape, num_classes=self.num_classes)
      self._programs[key] = jax.jit(fn, out_shardings=(index.sharding, index.sharding))
    image, label = self._programs[key](index)
    out = {k: v for k, v in placed.items() if k != 'index'}
    return dict(out, image=image, label=label)


def load(config) -> SyntheticSource:
  spec = base.DATASETS.get(config.dataset)
  if spec is None:
    raise UserError(f'{setting("data_source")}=synthetic takes its image shape and class count from '
                    f'{setting("dataset")}, and {config.dataset!r} is not built in: use one of '
                    f'{", ".join(sorted(base.DATASETS))}')
  h, w, c = spec.image_shape
  if config.image_size:
    h = w = config.image_size
  if config.augment != 'none' or config.normalize:
    logging.info('Synthetic data: %s are not applied (generated pixels are in [0, 1) at their final size).',
                 ' and '.join(f'{k}={config[k]}' for k in ('augment', 'normalize') if config[k] not in ('none', False)))
  counts = {'train': config.synthetic_train_examples, 'eval': config.synthetic_eval_examples}
  return SyntheticSource(config.dataset, (h, w, c), spec.num_classes, counts, config.seed)


def index_batches(num_examples: int, seed: int, global_batch: int, rows, start_step: int, num_steps: int):
  """Host dicts {'index': int32 [hi-lo]} of train steps `start_step .. num_steps-1` (`order.epoch_batches`)."""
  from input_pipeline import order
  spe = order.steps_per_epoch(num_examples, global_batch)
  lo, hi = rows
  epoch, table = None, None
  for step in range(start_step, num_steps):
    if step // spe != epoch:
      epoch = step // spe
      table = order.epoch_batches(seed, epoch, num_examples, global_batch)[:, lo:hi]
    yield {'index': np.ascontiguousarray(table[step % spe])}

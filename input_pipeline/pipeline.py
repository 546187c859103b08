"""tf.data streams of this process's slice of every global batch.

Each process reads rows `rows = (lo, hi)` of every global batch (the rows its devices hold, computed by
`parallel.mesh.process_rows`). Images are gathered and scaled to float32 [0, 1] here, on host threads,
so the train step receives ready batches.
"""

from typing import Iterator, Tuple

import numpy as np
import tensorflow as tf

from input_pipeline import order

# TensorFlow is only a data loader here: it must never grab an accelerator's memory.
tf.config.set_visible_devices([], 'GPU')
if tf.config.list_physical_devices('TPU'):
  tf.config.set_visible_devices([], 'TPU')


def _options(threads: int) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.threading.private_threadpool_size = threads
  opts.autotune.enabled = True
  return opts


def _scale(images_t, labels_t, idx):
  return {'image': tf.cast(tf.gather(images_t, idx), tf.float32) * (1.0 / 255.0),
          'label': tf.gather(labels_t, idx)}


def train_dataset(images: np.ndarray, labels: np.ndarray, *, seed: int, global_batch: int,
                  rows: Tuple[int, int], start_step: int, num_steps: int, threads: int = 2) -> tf.data.Dataset:
  """Batches `start_step .. num_steps-1` of the train stream, this process's rows of each.

  Yields dicts: `image` float32 [hi-lo, H, W, C] in [0, 1], `label` int32 [hi-lo].
  """
  n = len(images)
  spe = order.steps_per_epoch(n, global_batch)
  lo, hi = rows
  first_epoch, last_epoch = start_step // spe, max(num_steps - 1, start_step) // spe

  def epoch_rows(epoch):
    return order.epoch_batches(seed, int(epoch), n, global_batch)[:, lo:hi]

  ds = tf.data.Dataset.range(first_epoch, last_epoch + 1)
  ds = ds.map(lambda e: tf.ensure_shape(tf.numpy_function(epoch_rows, [e], tf.int32, stateful=False),
                                        [spe, hi - lo]))
  ds = ds.flat_map(tf.data.Dataset.from_tensor_slices)
  ds = ds.skip(start_step - first_epoch * spe).take(max(num_steps - start_step, 0))
  images_t, labels_t = tf.constant(images), tf.constant(labels)
  ds = ds.map(lambda i: _scale(images_t, labels_t, i), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads))


def eval_dataset(images: np.ndarray, labels: np.ndarray, *, eval_batch: int, rows: Tuple[int, int],
                 threads: int = 2) -> tf.data.Dataset:
  """Every eval batch (last one padded), this process's rows: adds `mask` float32 (1 = real example)."""
  idx, mask = order.eval_batches(len(images), eval_batch)
  lo, hi = rows
  images_t, labels_t = tf.constant(images), tf.constant(labels)
  ds = tf.data.Dataset.from_tensor_slices((idx[:, lo:hi], mask[:, lo:hi].astype(np.float32)))
  ds = ds.map(lambda i, m: dict(_scale(images_t, labels_t, i), mask=m), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads))


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict]:
  return ds.as_numpy_iterator()

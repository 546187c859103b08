"""tf.data streams of this process's slice of every global batch, read, decoded and augmented on host threads.

Each process reads rows `rows = (lo, hi)` of every global batch (the rows its devices hold, computed by
`parallel.mesh.process_rows`): `order` names the global example indices, the source reads only those, and
`augment.Preprocess` turns each into float32 pixels with a stateless RNG key of (seed, step, index). So the
stream is a pure function of (seed, step, position in the global batch): any topology, and a resumed run,
see the same pixels. A file that cannot be decoded stops the stream with one line naming it and the step.
"""

import os
from collections.abc import Callable, Iterator

import numpy as np

from errors import UserError, first_line, setting
from input_pipeline import augment, order, tf_host

tf = tf_host.module()  # This module is the tf.data path: TensorFlow loads here, off the accelerators.


def _options(threads: int) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.threading.private_threadpool_size = threads or os.cpu_count() or 1
  opts.autotune.enabled = True
  return opts


def _example(prep: augment.Preprocess, image):
  return tf.ensure_shape(image, prep.output_shape)


def train_dataset(source, prep: augment.Preprocess, *, seed: int, global_batch: int, rows: tuple[int, int],
                  start_step: int, num_steps: int, threads: int = 0, steps_per_element: int = 1) -> tf.data.Dataset:
  """Batches `start_step .. num_steps-1` of the train stream, this process's rows of each.

  Yields dicts: `image` float32 [hi-lo, *prep.output_shape], `label` int32 [hi-lo]. With `steps_per_element`
  k > 1 and `whole_batches`, each element stacks k steps' batches [k, hi-lo, ...] (the last one may hold
  fewer), read with one gather: a tf.data element costs tens of µs of host time whatever its size.
  """
  n = source.num_examples('train')
  spe = order.steps_per_epoch(n, global_batch)
  lo, hi = rows
  first_epoch, last_epoch = start_step // spe, max(num_steps - 1, start_step) // spe

  def epoch_rows(epoch):
    return order.epoch_batches(seed, int(epoch), n, global_batch)[:, lo:hi]

  ds = tf.data.Dataset.range(first_epoch, last_epoch + 1)
  ds = ds.map(lambda e: tf.ensure_shape(tf.numpy_function(epoch_rows, [e], tf.int32, stateful=False),
                                        [spe, hi - lo]))
  ds = ds.flat_map(tf.data.Dataset.from_tensor_slices).skip(start_step - first_epoch * spe)
  ds = tf.data.Dataset.zip(ds, tf.data.Dataset.range(start_step, max(num_steps, start_step)))
  read = source.reader('train')
  if whole_batches(source, prep) and steps_per_element > 1:
    def chunk(idx, step):
      b = _batch(prep, read(tf.reshape(tf.cast(idx, tf.int64), [-1])))
      return {k: tf.reshape(v, tf.concat([tf.shape(idx), tf.shape(v)[1:]], 0)) for k, v in b.items()}
    ds = ds.batch(steps_per_element).map(chunk, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads))
  if whole_batches(source, prep):
    ds = ds.map(lambda idx, step: _batch(prep, read(tf.cast(idx, tf.int64))), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads))
  ds = ds.flat_map(lambda idx, step: tf.data.Dataset.from_tensor_slices((idx, tf.fill([hi - lo], step))))

  def one(i, step):
    image, label = read(tf.cast(i, tf.int64))
    return {'image': _example(prep, prep.train(image, augment.example_key(seed, step, i))), 'label': label}

  ds = ds.map(one, num_parallel_calls=tf.data.AUTOTUNE).batch(hi - lo)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads))


def whole_batches(source, prep) -> bool:
  """In-memory arrays without per-example randomness or resizing: one gather + scale per batch (~50x faster
  than per-example map; the same values)."""
  return getattr(source, 'reads_batches', False) and prep.per_pixel_only


def _batch(prep, read_result, **extra):
  images, labels = read_result
  return {'image': tf.ensure_shape(prep.eval(images), [None, *prep.output_shape]), 'label': labels, **extra}


def eval_dataset(source, prep: augment.Preprocess, *, eval_batch: int, rows: tuple[int, int],
                 threads: int = 0) -> tf.data.Dataset:
  """Every eval batch (last one padded), this process's rows: adds `mask` float32 (1 = real example)."""
  idx, mask = order.eval_batches(source.num_examples('eval'), eval_batch)
  lo, hi = rows
  read = source.reader('eval')
  if whole_batches(source, prep):
    ds = tf.data.Dataset.from_tensor_slices((idx[:, lo:hi], mask[:, lo:hi].astype(np.float32)))
    ds = ds.map(lambda i, m: _batch(prep, read(tf.cast(i, tf.int64)), mask=m), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads))

  def one(i, m):
    image, label = read(tf.cast(i, tf.int64))
    return {'image': _example(prep, prep.eval(image)), 'label': label, 'mask': m}

  ds = tf.data.Dataset.from_tensor_slices((idx[:, lo:hi].reshape(-1), mask[:, lo:hi].reshape(-1).astype(np.float32)))
  ds = ds.map(one, num_parallel_calls=tf.data.AUTOTUNE).batch(hi - lo)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads))


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict]:
  return ds.as_numpy_iterator()


def find_bad_example(source, prep: augment.Preprocess, split: str, indices, *, seed=0, step=0):
  """(index, error) of the first of `indices` that fails to read, decode or reach the output shape; None if
  all pass (run eagerly, one example at a time: only after the batched stream failed)."""
  read = source.reader(split)
  for i in indices:
    i = int(i)
    try:
      image, _ = read(tf.constant(i, tf.int64))
      out = prep.train(image, augment.example_key(seed, step, i)) if split == 'train' else prep.eval(image)
      _example(prep, out)
    except (tf.errors.OpError, ValueError) as e:
      return i, e
  return None


def checked(batches: Iterator[dict], explain: Callable[[int, Exception], UserError]) -> Iterator[dict]:
  """`batches`, with a TF error while building batch k (0-based) turned into `explain(k, error)`."""
  k = 0
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      raise explain(k, e) from None
    yield batch
    k += 1


def bad_data_error(source, prep, split: str, indices, error: Exception, when: str, **key) -> UserError:
  """One line naming the file behind a failed batch (or, if none fails alone, the batch's error)."""
  bad = find_bad_example(source, prep, split, indices, **key)
  if bad is None:
    return UserError(f'the input batch {when} could not be built ({first_line(error)}): check the data files')
  i, e = bad
  msg = first_line(e)
  if 'shape' in msg.lower() and prep.output_shape:
    msg = f'its shape differs from {prep.output_shape} ({msg}); set the image size with {setting("image_size")}'
  return UserError(f'{source.name_of(split, i)} could not be read {when}: {msg}: remove or replace the file '
                   '(training stopped; checkpoints written so far are intact)')

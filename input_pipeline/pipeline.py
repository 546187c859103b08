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
  def one(i, step, image, label):
    return {'image': _example(prep, prep.train(image, augment.example_key(seed, step, i))), 'label': label}

  if getattr(source, 'remote', False):
    def items():  # (index, step) in the order the batches hold them: what `read_ahead` fetches ahead.
      for epoch in range(first_epoch, last_epoch + 1):
        rows_of = epoch_rows(epoch)
        for step in range(max(start_step, epoch * spe), min(max(num_steps, start_step), (epoch + 1) * spe)):
          for i in rows_of[step - epoch * spe]:
            yield i, step
    ds = _read_ahead(source, 'train', items, tf.int64)
    parse = source.parser('train')
    ds = ds.map(lambda i, step, data: one(i, step, *parse(i, data)), num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = ds.flat_map(lambda idx, step: tf.data.Dataset.from_tensor_slices((idx, tf.fill([hi - lo], step))))
    ds = ds.map(lambda i, step: one(i, step, *read(tf.cast(i, tf.int64))), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(hi - lo).prefetch(tf.data.AUTOTUNE).with_options(_options(threads))


def _read_ahead(source, split: str, items: Callable, second) -> tf.data.Dataset:
  """(index int64, the item's second field, the example's bytes) for each (index, second) of `items()`, the
  bytes fetched ahead on `read_ahead`'s I/O threads (a bucket source: one request per example)."""
  from input_pipeline import read_ahead
  fetch = source.fetcher(split)
  return tf.data.Dataset.from_generator(
      lambda: read_ahead.fetched(fetch, items()),
      output_signature=(tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], second),
                        tf.TensorSpec([None], tf.string))).unbatch()


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

  def one(image, label, m):
    return {'image': _example(prep, prep.eval(image)), 'label': label, 'mask': m}

  flat_idx, flat_mask = idx[:, lo:hi].reshape(-1), mask[:, lo:hi].reshape(-1).astype(np.float32)
  if getattr(source, 'remote', False):
    ds = _read_ahead(source, 'eval', lambda: zip(flat_idx, flat_mask, strict=True), tf.float32)
    parse = source.parser('eval')
    ds = ds.map(lambda i, m, data: one(*parse(i, data), m), num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = tf.data.Dataset.from_tensor_slices((flat_idx, flat_mask))
    ds = ds.map(lambda i, m: one(*read(tf.cast(i, tf.int64)), m), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(hi - lo).prefetch(tf.data.AUTOTUNE).with_options(_options(threads))


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

"""The device feed: several steps per tf.data element must give exactly the one-step-per-element stream."""

import numpy as np
import tensorflow as tf

from input_pipeline import device_feed


def _dataset(steps, rows=8, shape=(4, 4, 1)):
  rng = np.random.default_rng(0)
  images = rng.random((steps, rows) + shape, dtype=np.float32)
  labels = rng.integers(0, 10, (steps, rows)).astype(np.int32)
  return tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels}), images, labels


def test_chunked_feed_yields_the_same_batches_in_order():
  ds, images, labels = _dataset(37)  # Not a multiple of the chunk: the last element is short.
  assert device_feed.steps_per_element(ds.element_spec) == device_feed.MAX_CHUNK
  got = list(device_feed.from_dataset(ds, put=lambda b: b))
  assert len(got) == 37
  for i, batch in enumerate(got):
    np.testing.assert_array_equal(batch['image'], images[i])
    np.testing.assert_array_equal(batch['label'], labels[i])


def test_large_or_unknown_batches_are_not_chunked():
  big, _, _ = _dataset(2, rows=64, shape=(128, 128, 3))  # 12.6 MB per step: over the chunk budget.
  assert device_feed.steps_per_element(big.element_spec) == 1
  ragged = tf.data.Dataset.range(3).map(lambda i: {'image': tf.zeros([i + 1]), 'label': tf.zeros([], tf.int32)})
  assert device_feed.steps_per_element(ragged.element_spec) == 1
  assert len(list(device_feed.from_dataset(ragged, put=lambda b: b))) == 3

"""The device feed: several steps per tf.data element must give exactly the one-step-per-element stream."""

import jax
import numpy as np
import pytest
import tensorflow as tf

from benchmarks import kit
from input_pipeline import augment, device_feed, pipeline
from parallel import mesh as mesh_lib
from trainer import job as job_lib


def _dataset(steps, rows=8, shape=(4, 4, 1)):
  rng = np.random.default_rng(0)
  images = rng.random((steps, rows) + shape, dtype=np.float32)
  labels = rng.integers(0, 10, (steps, rows)).astype(np.int32)
  return tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels}), images, labels


def test_chunked_feed_yields_the_same_batches_in_order():
  ds, images, labels = _dataset(150)  # Not a multiple of the chunk: the last element is short.
  assert device_feed.steps_per_element(ds.element_spec) == device_feed.MAX_CHUNK
  got = list(device_feed.from_dataset(ds, put=lambda b: b))
  assert len(got) == 150
  for i, batch in enumerate(got):
    np.testing.assert_array_equal(batch['image'], images[i])
    np.testing.assert_array_equal(batch['label'], labels[i])



def test_a_short_last_element_is_padded_to_the_length_already_compiled():
  """`put_each` sees every element at one length (one split program); the stream's short tail is padded and the
  padding dropped, so no second program compiles where the loop waits (benchmarks/host_overhead.py)."""
  ds, images, labels = _dataset(150)
  chunks = ds.batch(64)  # 64, 64, 22: as `pipeline.train_dataset(steps_per_element=64)` stacks them.
  lengths = []

  def put_each(chunk):
    lengths.append(len(chunk['label']))
    return [{name: v[i] for name, v in chunk.items()} for i in range(len(chunk['label']))]
  got = list(device_feed.from_dataset(chunks, put=lambda b: b, put_each=put_each, stacked=True))
  assert lengths == [64, 64, 64]
  assert len(got) == 150
  for i, batch in enumerate(got):
    np.testing.assert_array_equal(batch['image'], images[i])
    np.testing.assert_array_equal(batch['label'], labels[i])


def test_large_or_unknown_batches_are_not_chunked():
  big, _, _ = _dataset(2, rows=64, shape=(128, 128, 3))  # 12.6 MB per step: over the chunk budget.
  assert device_feed.steps_per_element(big.element_spec) == 1
  ragged = tf.data.Dataset.range(3).map(lambda i: {'image': tf.zeros([i + 1]), 'label': tf.zeros([], tf.int32)})
  assert device_feed.steps_per_element(ragged.element_spec) == 1
  assert len(list(device_feed.from_dataset(ragged, put=lambda b: b))) == 3


def _source(n=200, shape=(6, 6, 1)):
  return kit.dataset(n=n, shape=shape, seed=1, test=16, labels='cycle')


@pytest.mark.parametrize('k', [7, 64])
def test_stacked_train_stream_equals_one_step_per_element(k):
  """`steps_per_element`: one gather per k steps, the same batches (a resume offset and a short last chunk)."""
  src = _source()
  prep = augment.Preprocess('none', channels=1, native_shape=src.image_shape)
  make = lambda spe: pipeline.train_dataset(src, prep, seed=3, global_batch=16, rows=(4, 12), start_step=5,
                                            num_steps=41, steps_per_element=spe)
  one = list(make(1).as_numpy_iterator())
  stacked = list(make(k).as_numpy_iterator())
  assert len(one) == 36 and len(stacked) == -(-36 // k)
  for name in ('image', 'label'):
    np.testing.assert_array_equal(np.concatenate([c[name] for c in stacked]), np.stack([b[name] for b in one]))


@pytest.mark.parametrize('backend', ['shard_map', 'pmap', 'jit'])
def test_placing_several_steps_at_once_gives_the_batches_train_step_takes(backend):
  c = kit.config(model='mlp', batch_size=16, eval_batch_size=16, parallel_backend=backend, num_train_steps=10)
  stepper = job_lib.build(c, mesh=mesh_lib.make_mesh(8), data=_source()).stepper
  rng = np.random.default_rng(0)
  chunk = {'image': rng.random((5, 16, 6, 6, 1), dtype=np.float32),
           'label': rng.integers(0, 10, (5, 16)).astype(np.int32)}
  each = stepper.place_each(chunk)
  assert len(each) == 5
  for i, placed in enumerate(each):
    want = stepper.place({name: v[i] for name, v in chunk.items()})
    for name in chunk:
      assert placed[name].shape == want[name].shape
      assert placed[name].sharding.is_equivalent_to(want[name].sharding, placed[name].ndim)
      np.testing.assert_array_equal(np.asarray(jax.device_get(placed[name])), np.asarray(jax.device_get(want[name])))

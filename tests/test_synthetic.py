"""`data_source=synthetic`: examples are a pure function of (seed, split, index), in every layout."""

import jax
import numpy as np
import pytest

from benchmarks import kit
from errors import UserError
from input_pipeline import order, sources, synthetic
from parallel import mesh as mesh_lib
from trainer import config_check, job as job_lib


def _config(**overrides):
  return kit.config(**{**dict(data_source='synthetic', synthetic_train_examples=96, synthetic_eval_examples=20,
                              batch_size=16, eval_batch_size=8, model='mlp'), **overrides})


def _train_batches(backend, devices, steps=3, sizes=None):
  job = job_lib.build(_config(parallel_backend=backend), mesh=mesh_lib.make_mesh(devices))
  feed = job.train_feed(0, steps, sizes=sizes)
  try:
    out = [jax.device_get(b) for b in feed]
  finally:
    feed.close()
  return job, out


def _flat(batch):
  """Any layout (pmap's device axis, k steps stacked) -> rows in global order."""
  return {k: np.asarray(v).reshape((-1,) + np.asarray(v).shape[-3:] if k == 'image' else -1) for k, v in batch.items()}


def test_examples_follow_the_order_and_do_not_depend_on_the_layout():
  job, one = _train_batches('shard_map', 1, steps=70)  # 64 steps per transfer, then a padded tail of 6.
  assert len(one) == 70
  spec = sources.DATASETS['fashion_mnist']
  for step, batch in enumerate(one):
    idx = order.epoch_batches(0, step // 6, 96, 16)[step % 6]
    images, labels = synthetic.examples(0, 'train', jax.numpy.asarray(idx), spec.image_shape, spec.num_classes)
    np.testing.assert_array_equal(batch['image'], np.asarray(images))
    np.testing.assert_array_equal(batch['label'], np.asarray(labels))
    assert batch['image'].shape == (16, 28, 28, 1) and batch['image'].dtype == np.float32
  assert 0 <= one[0]['image'].min() and one[0]['image'].max() < 1 and len(np.unique(one[0]['label'])) > 2
  for backend, devices in (('shard_map', 8), ('pmap', 8), ('jit', 4)):
    _, other = _train_batches(backend, devices, steps=70)
    for a, b in zip(one, other, strict=True):
      for key in ('image', 'label'):
        np.testing.assert_array_equal(_flat(a)[key], _flat(b)[key], err_msg=f'{backend} {devices}')
  _, stacked = _train_batches('shard_map', 8, steps=3, sizes=[2, 1])
  assert stacked[0]['image'].shape == (2, 16, 28, 28, 1)
  np.testing.assert_array_equal(_flat(stacked[0])['image'][16:], one[1]['image'])


def test_the_generator_is_row_local_and_eval_counts_every_example_once():
  job = job_lib.build(_config(), mesh=mesh_lib.make_mesh(8))
  placed = job.stepper.place({'index': np.arange(16, dtype=np.int32)})
  job.data.generate('train', placed)
  (program,) = job.data._programs.values()
  hlo = program.lower(placed['index']).compile().as_text()
  assert not any(op in hlo for op in ('all-gather', 'all-reduce', 'all-to-all', 'collective-permute')), hlo[:2000]
  feed = job.eval_feed()
  batches = [jax.device_get(b) for b in feed]
  assert len(batches) == 3 and sum(float(b['mask'].sum()) for b in batches) == 20
  spec = sources.DATASETS['fashion_mnist']
  same = jax.numpy.arange(8, dtype=jax.numpy.int32)
  np.testing.assert_array_equal(batches[0]['image'], synthetic.examples(0, 'eval', same, spec.image_shape, 10)[0])
  assert not np.array_equal(batches[0]['image'], synthetic.examples(0, 'train', same, spec.image_shape, 10)[0])


def test_shape_classes_and_size_come_from_the_dataset():
  data = sources.load(_config(dataset='cifar10', image_size=40))
  assert (data.image_shape, data.num_classes, data.num_examples('train')) == ((40, 40, 3), 10, 96)
  data = sources.load(_config(dataset='imagenet2012'))
  assert (data.image_shape, data.num_classes) == ((224, 224, 3), 1000)
  assert data.identity() != sources.load(_config(dataset='imagenet2012', seed=1)).identity()
  with pytest.raises(UserError, match="synthetic takes its image shape.*'svhn' is not built in: use one of"):
    sources.load(_config(dataset='svhn'))
  with pytest.raises(UserError, match='synthetic_eval_examples=0 is invalid'):
    config_check.validate(_config(synthetic_eval_examples=0))

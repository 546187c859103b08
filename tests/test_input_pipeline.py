"""Input pipeline: one global batch order for any topology, reshuffles, exact resume, exact eval, TFDS loading.

The in-memory source with `augment=none` here; images, augmentation and other sources: test_folder_source.py,
test_augment.py, test_tfds_source.py."""

import jax
import ml_collections
import numpy as np
import pytest

from benchmarks import kit
from configs import tiny
from errors import UserError
from input_pipeline import augment, order, pipeline, sources
from parallel import mesh as mesh_lib
from trainer import job as job_lib, loop

N, B, SHAPE = 100, 16, (4, 4, 1)  # 6 full batches per epoch; 4 examples are dropped each epoch.
SPE = N // B
NUM_STEPS = 3 * SPE + 2           # Runs into a fourth epoch.


@pytest.fixture(scope='module')
def train_arrays():
  """Random images (with the extremes 0 and 255) and labels = example index, so a batch names its examples."""
  images = np.random.default_rng(0).integers(0, 256, (N,) + SHAPE).astype(np.uint8)
  images[0], images[1] = 255, 0
  return images, np.arange(N, dtype=np.int32)


def _source(images, labels):
  return kit.dataset(images=images, labels=labels, test=(images, labels), classes=N)


def _none(images):
  return augment.Preprocess('none', 0, channels=images.shape[-1], native_shape=images.shape[1:])


def _eval_stream(images, labels, **kw):
  return list(pipeline.as_numpy(pipeline.eval_dataset(_source(images, labels), _none(images), **kw)))


def _stream(arrays, *, rows=None, start_step=0, num_steps=NUM_STEPS, seed=0, global_batch=B):
  images, labels = arrays
  rows = rows or (0, global_batch)
  ds = pipeline.train_dataset(_source(images, labels), _none(images), seed=seed, global_batch=global_batch, rows=rows,
                              start_step=start_step, num_steps=num_steps)
  return list(pipeline.as_numpy(ds))


def _expected_indices(seed=0, start_step=0, num_steps=NUM_STEPS, global_batch=B):
  spe = N // global_batch
  return [order.epoch_batches(seed, step // spe, N, global_batch)[step % spe] for step in range(start_step, num_steps)]


def _check_stream(batches, arrays, expected):
  """Each batch holds exactly the expected examples, in order, with images scaled to float32 [0, 1]."""
  images, _ = arrays
  assert len(batches) == len(expected)
  for batch, idx in zip(batches, expected, strict=True):
    np.testing.assert_array_equal(batch['label'], idx)
    assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
    np.testing.assert_allclose(batch['image'], images[idx].astype(np.float32) / 255.0, rtol=1e-6, atol=0)


@pytest.fixture(scope='module')
def full_stream(train_arrays):
  return _stream(train_arrays)


# --- one batch order for every topology ----------------------------------------------------------------------


def test_expected_order_is_a_permutation_per_epoch():
  for epoch in range(3):
    batches = order.epoch_batches(0, epoch, N, B)
    assert batches.shape == (SPE, B) and batches.dtype == np.int32
    assert len(np.unique(batches)) == SPE * B and batches.min() >= 0 and batches.max() < N


def test_single_stream_matches_order(train_arrays, full_stream):
  _check_stream(full_stream, train_arrays, _expected_indices())


@pytest.mark.parametrize('num_devices', [1, 2, 4, 8])
def test_same_global_batches_for_any_device_count(train_arrays, full_stream, num_devices):
  mesh = mesh_lib.make_mesh(num_devices=num_devices)
  assert mesh.devices.size == num_devices
  rows = mesh_lib.process_rows(mesh, B)
  assert rows == (0, B)  # One process holds every row.
  batches = _stream(train_arrays, rows=rows)
  _check_stream(batches, train_arrays, _expected_indices())
  for got, ref in zip(batches, full_stream, strict=True):
    np.testing.assert_array_equal(got['image'], ref['image'])
  # On the devices: device i of the mesh holds rows [i*B/k, (i+1)*B/k) of the global batch.
  placed = mesh_lib.to_global(mesh, batches[1])
  assert placed['image'].shape == (B,) + SHAPE
  np.testing.assert_array_equal(np.asarray(placed['label']), batches[1]['label'])
  per_device = B // num_devices
  position = {d: i for i, d in enumerate(mesh.devices.flat)}
  assert len(placed['label'].addressable_shards) == num_devices
  for shard in placed['label'].addressable_shards:
    i = position[shard.device]
    np.testing.assert_array_equal(np.asarray(shard.data), batches[1]['label'][i * per_device:(i + 1) * per_device])


@pytest.mark.parametrize('num_processes', [2, 4])
def test_same_global_batches_for_simulated_processes(train_arrays, num_processes):
  rows_per = B // num_processes
  parts = [_stream(train_arrays, rows=(p * rows_per, (p + 1) * rows_per)) for p in range(num_processes)]
  for p_batches in parts:
    assert all(b['label'].shape == (rows_per,) and b['image'].shape == (rows_per,) + SHAPE for b in p_batches)
  joined = [{k: np.concatenate([p[s][k] for p in parts]) for k in ('image', 'label')} for s in range(NUM_STEPS)]
  _check_stream(joined, train_arrays, _expected_indices())


def test_eval_batches_for_simulated_processes(train_arrays):
  images, labels = train_arrays
  eb = 16
  idx, mask = order.eval_batches(N, eb)
  assert idx.shape == (7, eb) and mask.sum() == N
  parts = [_eval_stream(images, labels, eval_batch=eb, rows=r)
           for r in ((0, 8), (8, 16))]
  for step in range(len(idx)):
    label = np.concatenate([p[step]['label'] for p in parts])
    m = np.concatenate([p[step]['mask'] for p in parts])
    np.testing.assert_array_equal(label, labels[idx[step]])
    np.testing.assert_array_equal(m, mask[step].astype(np.float32))
  seen = np.concatenate([np.concatenate([p[s]['label'] for p in parts])[
      np.concatenate([p[s]['mask'] for p in parts]) > 0] for s in range(len(idx))])
  np.testing.assert_array_equal(np.sort(seen), np.arange(N))  # Every example exactly once.


# --- epochs, seeds, dropped remainder ----------------------------------------------------------------------------


def test_each_epoch_reshuffles(full_stream):
  epochs = [np.stack([b['label'] for b in full_stream[e * SPE:(e + 1) * SPE]]) for e in range(3)]
  for e in epochs:
    assert len(np.unique(e)) == SPE * B  # No example twice within an epoch.
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  # Different examples are dropped in different epochs, so the union covers more than one epoch's worth.
  assert len(np.unique(np.concatenate(epochs))) > SPE * B


def test_seed_changes_order_and_is_deterministic(train_arrays, full_stream):
  again = _stream(train_arrays, num_steps=SPE)
  for a, b in zip(again, full_stream[:SPE], strict=True):
    np.testing.assert_array_equal(a['label'], b['label'])
  other = _stream(train_arrays, num_steps=SPE, seed=1)
  _check_stream(other, train_arrays, _expected_indices(seed=1, num_steps=SPE))
  assert not np.array_equal(np.stack([b['label'] for b in other]),
                            np.stack([b['label'] for b in full_stream[:SPE]]))


def test_incomplete_last_batch_dropped(train_arrays, full_stream):
  assert order.steps_per_epoch(N, B) == SPE == 6
  assert len(full_stream) == NUM_STEPS
  assert all(b['label'].shape == (B,) for b in full_stream)
  # Step SPE is the first batch of epoch 1, not epoch 0's 4 leftover examples.
  np.testing.assert_array_equal(full_stream[SPE]['label'], order.epoch_batches(0, 1, N, B)[0])
  leftover = np.setdiff1d(np.arange(N), np.concatenate([b['label'] for b in full_stream[:SPE]]))
  assert len(leftover) == N - SPE * B == 4
  # Exactly one epoch requested: nothing more comes out.
  assert len(_stream(train_arrays, num_steps=SPE)) == SPE
  # A batch that divides the data drops nothing.
  exact = _stream(train_arrays, num_steps=2, global_batch=50)
  assert len(np.unique(np.concatenate([b['label'] for b in exact]))) == N


# --- resume ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('start_step', [1, SPE - 1, SPE, SPE + 1, 2 * SPE + 3, NUM_STEPS - 1, NUM_STEPS])
def test_resume_yields_the_rest_of_the_stream(train_arrays, full_stream, start_step):
  resumed = _stream(train_arrays, start_step=start_step)
  assert len(resumed) == NUM_STEPS - start_step
  for got, ref in zip(resumed, full_stream[start_step:], strict=True):
    np.testing.assert_array_equal(got['label'], ref['label'])
    np.testing.assert_array_equal(got['image'], ref['image'])


@pytest.mark.parametrize('start_step', [0, SPE - 1, SPE])
def test_stream_ends_exactly_at_num_steps(train_arrays, full_stream, start_step):
  for num_steps in (SPE - 1, SPE, SPE + 1, 2 * SPE, 2 * SPE + 1):
    got = _stream(train_arrays, start_step=start_step, num_steps=num_steps)
    ref = full_stream[start_step:num_steps]
    assert len(got) == len(ref), (start_step, num_steps)
    for g, r in zip(got, ref, strict=True):
      np.testing.assert_array_equal(g['label'], r['label'])


def test_resume_with_process_rows(train_arrays, full_stream):
  start = SPE - 2  # Crosses an epoch boundary two steps in.
  halves = [_stream(train_arrays, rows=r, start_step=start) for r in ((0, B // 2), (B // 2, B))]
  for s, ref in enumerate(full_stream[start:]):
    np.testing.assert_array_equal(np.concatenate([h[s]['label'] for h in halves]), ref['label'])


# --- image values --------------------------------------------------------------------------------------------------


def test_images_are_float32_in_unit_range(train_arrays, full_stream):
  images, labels = train_arrays
  all_images = np.concatenate([b['image'] for b in full_stream])
  assert all_images.dtype == np.float32
  assert all_images.min() >= 0.0 and all_images.max() <= 1.0
  assert all_images.min() == 0.0 and all_images.max() == pytest.approx(1.0, abs=1e-7)
  ev = _eval_stream(images, labels, eval_batch=8, rows=(0, 8))
  np.testing.assert_allclose(ev[0]['image'], images[:8].astype(np.float32) / 255.0, rtol=1e-6, atol=0)
  assert ev[0]['image'].dtype == np.float32 and ev[0]['mask'].dtype == np.float32
  assert ev[0]['image'][0].max() == pytest.approx(1.0, abs=1e-7)  # Example 0 is all 255.


# --- exact eval over the 8 simulated devices ----------------------------------------------------------------------

EVAL_SHAPE = (8, 8, 1)


def _eval_config(model, eval_batch, backend):
  c = tiny.get_config()
  c.model = model
  c.eval_batch_size = eval_batch
  c.batch_size = 8
  c.parallel_backend = backend
  return c


def _job(backend, eval_batch, data):
  return job_lib.build(_eval_config('mlp', eval_batch, backend), mesh=mesh_lib.make_mesh(), data=data)


@pytest.fixture(scope='module')
def eval_setup():
  """(eval model, canonical initial state) of the MLP on 8 devices, shared by the eval tests."""
  job = _job('shard_map', 16, _test_data(1))
  assert job.mesh.devices.size == 8, 'conftest should give 8 simulated CPU devices'
  return job.eval_model, job.initial_state()


def _test_data(size, seed=1):
  # The train split only gives the image shape; evaluation must not read it.
  return kit.dataset(n=8, shape=EVAL_SHAPE, images='zeros', labels='cycle',
                     test=kit.arrays(size, EVAL_SHAPE, seed=seed))


def _reference(eval_model, state, data):
  """Loss and accuracy of the whole test set in one plain batch, on the host."""
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  with jax.default_device(jax.devices('cpu')[0]):
    logits = np.asarray(eval_model.apply(variables, data.test_images.astype(np.float32) / 255.0, train=False),
                        np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  loss = -log_probs[np.arange(len(data.test_labels)), data.test_labels].mean()
  accuracy = (logits.argmax(-1) == data.test_labels).mean()
  return loss, accuracy


@pytest.mark.parametrize('backend', ['shard_map', 'pmap'])
@pytest.mark.parametrize('eval_batch', [16, 8])
@pytest.mark.parametrize('size', [1, 7, 999])
def test_exact_eval(eval_setup, backend, eval_batch, size):
  eval_model, state = eval_setup
  data = _test_data(size)
  job = _job(backend, eval_batch, data)
  result = loop.evaluate(job, job.stepper.to_device(state))
  loss, accuracy = _reference(eval_model, state, data)
  assert result['test_examples'] == size
  assert result['test_loss'] == pytest.approx(loss, abs=1e-5)
  assert result['test_accuracy'] == pytest.approx(accuracy, abs=1e-5)


def test_exact_eval_reference_is_sensitive(eval_setup):
  """The reference tells test sets apart (so matching it means something)."""
  eval_model, state = eval_setup
  a, b = _reference(eval_model, state, _test_data(999, seed=1)), _reference(eval_model, state, _test_data(998, 1))
  assert abs(a[0] - b[0]) > 1e-6 or abs(a[1] - b[1]) > 1e-6


# --- TFDS -----------------------------------------------------------------------------------------------------------


def _tfds_config(dataset, data_dir, download):
  return ml_collections.ConfigDict(dict(dataset=dataset, data_source='tfds', data_dir=data_dir, download=download,
                                        eval_split=''))


def test_tfds_mock_mnist(tmp_path):
  import tensorflow_datasets as tfds
  # Downloads are "allowed" but mocked to a no-op: nothing touches the network.
  with tfds.testing.mock_data(num_examples=20):
    data = sources.load(_tfds_config('mnist', str(tmp_path), True))
    assert data.description.startswith('tfds:')
    assert data.num_examples('train') == 20 and data.num_examples('eval') == 20
    assert data.num_classes == 10 and data.image_shape == (28, 28, 1) and data.channels == 1
    batches = _eval_stream_of(data, eval_batch=8)
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert images.shape == (24, 28, 28, 1) and images.dtype == np.float32 and labels.dtype == np.int32
  assert sum(b['mask'].sum() for b in batches) == 20
  assert labels.min() >= 0 and labels.max() < 10 and 0 <= images.min() and images.max() <= 1


def _eval_stream_of(data, eval_batch):
  prep = augment.Preprocess('none', 0, channels=data.channels, native_shape=data.image_shape)
  return list(pipeline.as_numpy(pipeline.eval_dataset(data, prep, eval_batch=eval_batch, rows=(0, eval_batch))))


@pytest.mark.parametrize('dataset', ['mnist', 'cifar10'])
def test_tfds_not_prepared_without_download(tmp_path, dataset):
  with pytest.raises(UserError) as e:
    sources.load(_tfds_config(dataset, str(tmp_path), False))
  assert str(tmp_path) in str(e.value) and dataset in str(e.value)
  assert 'download' in str(e.value)


def test_unknown_dataset(tmp_path):
  with pytest.raises(UserError, match='no_such_dataset'):
    sources.load(_tfds_config('no_such_dataset', str(tmp_path), False))


# --- batch sizes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('batch, devices, sizes', [(100, 8, ['96', '104']), (130, 4, ['128', '132']),
                                                    (4, 8, ['8']), (7, 2, ['6', '8'])])
def test_check_batch_names_valid_sizes(batch, devices, sizes):
  with pytest.raises(UserError) as e:
    mesh_lib.check_batch(batch, devices, 'eval_batch_size')
  msg = str(e.value)
  assert 'eval_batch_size' in msg and str(batch) in msg and str(devices) in msg
  for s in sizes:
    assert s in msg
  for s in sizes:
    mesh_lib.check_batch(int(s), devices)  # The suggested sizes really are valid.


@pytest.mark.parametrize('batch, devices', [(128, 8), (8, 8), (1, 1), (6, 2)])
def test_check_batch_accepts_multiples(batch, devices):
  mesh_lib.check_batch(batch, devices)


@pytest.mark.parametrize('batch', [0, -8])
def test_check_batch_rejects_non_positive(batch):
  with pytest.raises(UserError, match='positive'):
    mesh_lib.check_batch(batch, 8)

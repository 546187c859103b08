"""Parallel correctness by comparison: N devices vs 1, shard_map vs pmap, local vs synced BatchNorm.

Runs in-process on the 8 simulated CPU devices that conftest.py configures. The CNN comparisons compile the
real default model several times (`slow`); the MLP one keeps the same check in the quick subset.
"""

import jax
import numpy as np
import pytest

from configs import default
from input_pipeline import sources
from parallel import mesh as mesh_lib
from trainer import job as job_lib

K_STEPS = 5
GLOBAL_BATCH = 32


def _config(**overrides):
  c = default.get_config()
  c.lr_schedule = 'constant'
  c.update(overrides)
  return c


def _batches(k=K_STEPS, batch=GLOBAL_BATCH, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.random((batch, 28, 28, 1), dtype=np.float32),
           'label': rng.integers(0, 10, batch).astype(np.int32)} for _ in range(k)]


def _data(batch=GLOBAL_BATCH):
  """Shapes only: the steps below feed their own batches, build() just needs the dataset's metadata."""
  images = np.zeros((batch, 28, 28, 1), np.uint8)
  labels = np.zeros((batch,), np.int32)
  return sources.InMemoryDataset(images, labels, images[:8], labels[:8], num_classes=10, source='test')


def _local_rows(mesh, batch):
  lo, hi = mesh_lib.process_rows(mesh, len(batch['label']))
  return {k: v[lo:hi] for k, v in batch.items()}


def _train(num_devices, backend='shard_map', bn_mode='global', dtype='float32', batches=None, return_raw=False,
           model='cnn'):
  """K steps of `model` (the default CNN unless told), built by the trainer's own job builder; returns the
  canonical state as flat numpy (and the losses)."""
  config = _config(parallel_backend=backend, bn_mode=bn_mode, dtype=dtype, batch_size=GLOBAL_BATCH, model=model,
                   eval_batch_size=8 * num_devices, num_train_steps=100)
  job = job_lib.build(config, mesh=mesh_lib.make_mesh(num_devices), data=_data())
  stepper = job.stepper
  state = stepper.to_device(job.initial_state())
  losses = []
  for batch in batches or _batches():
    state, metrics = stepper.train_step(state, stepper.place(_local_rows(job.mesh, batch)))
    losses.append(float(stepper.metrics(metrics)['loss_sum']))
  if return_raw:
    return stepper, state
  state = stepper.to_canonical(stepper.sync_batch_stats(state))
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path((state.params, state.batch_stats))}
  return flat, losses


def _max_diff(a, b):
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope='module')
def one_device():
  return _train(1)


@pytest.mark.slow
def test_eight_devices_match_one(one_device):
  ref, ref_losses = one_device
  got, losses = _train(8)
  assert _max_diff(ref, got) < 1e-5
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # The run really learned something, so the comparison is not between two untouched inits.
  assert _max_diff(ref, _train(1, batches=_batches(k=1))[0]) > 1e-3


@pytest.mark.slow
def test_pmap_matches_shard_map(one_device):
  ref, _ = one_device
  got, _ = _train(8, backend='pmap')
  assert _max_diff(ref, got) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize('num_devices', [2, 4])
def test_other_device_counts_match_one(one_device, num_devices):
  assert _max_diff(one_device[0], _train(num_devices)[0]) < 1e-5


@pytest.mark.slow
def test_local_bn_sync_is_mean_of_devices():
  stepper, state = _train(8, bn_mode='local', return_raw=True)
  before = jax.tree.map(np.asarray, state.batch_stats)  # [8, ...]: one row per device.
  rows = jax.tree.leaves(before)
  assert any(np.max(np.abs(r - r[:1])) > 1e-6 for r in rows), 'devices should hold different local stats'
  synced = jax.tree.map(np.asarray, stepper.sync_batch_stats(state).batch_stats)
  for b, s in zip(rows, jax.tree.leaves(synced)):
    np.testing.assert_allclose(s, np.broadcast_to(b.mean(0), b.shape), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_local_bn_pmap_matches_shard_map():
  a, _ = _train(8, bn_mode='local')
  b, _ = _train(8, bn_mode='local', backend='pmap')
  assert _max_diff(a, b) < 1e-5


@pytest.mark.slow
def test_local_bn_differs_from_global(one_device):
  local, _ = _train(8, bn_mode='local')
  assert _max_diff(one_device[0], local) > 1e-4  # Per-device statistics really are per device.


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  flat, losses = _train(2, dtype='bfloat16', batches=_batches(k=2))
  assert all(v.dtype == np.float32 for v in flat.values())
  assert np.all(np.isfinite(losses))


@pytest.mark.parametrize('bn_mode', ['global', 'local'])
def test_mlp_eight_devices_match_one_and_pmap(bn_mode):
  """The quick subset's parallel check: the MLP (with BatchNorm) on 8 devices, both backends, vs 1 device."""
  ref, ref_losses = _train(1, model='mlp', bn_mode='global')
  got, losses = _train(8, model='mlp', bn_mode=bn_mode)
  pm, _ = _train(8, model='mlp', bn_mode=bn_mode, backend='pmap')
  assert _max_diff(got, pm) < 1e-5
  if bn_mode == 'global':
    assert _max_diff(ref, got) < 1e-5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  else:
    assert _max_diff(ref, got) > 1e-4  # Per-device statistics really are per device.

"""Parallel correctness by comparison: N devices vs 1, shard_map vs pmap vs jit, FSDP vs replicated, local vs
synced BatchNorm.

Runs in-process on the 8 simulated CPU devices that conftest.py configures. The CNN comparisons compile the
real default model several times (`slow`); the MLP one keeps the same check in the quick subset.
"""

import jax
import numpy as np
import pytest

from benchmarks import kit
from parallel import mesh as mesh_lib
from trainer import job as job_lib

K_STEPS = 5
GLOBAL_BATCH = 32


def _config(**overrides):
  return kit.config(**{'lr_schedule': 'constant', **overrides})


def _batches(k=K_STEPS, batch=GLOBAL_BATCH, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.random((batch, 28, 28, 1), dtype=np.float32),
           'label': rng.integers(0, 10, batch).astype(np.int32)} for _ in range(k)]


def _data(batch=GLOBAL_BATCH):
  """Shapes only: the steps below feed their own batches, build() just needs the dataset's metadata."""
  return kit.dataset(n=batch, shape=(28, 28, 1), test=8, images='zeros', labels='cycle')  # job.build: >= 2 classes.


def _local_rows(mesh, batch):
  lo, hi = mesh_lib.process_rows(mesh, len(batch['label']))
  return {k: v[lo:hi] for k, v in batch.items()}


def _train(num_devices, backend='shard_map', bn_mode='global', dtype='float32', batches=None, return_raw=False,
           model='cnn', **overrides):
  """K steps of `model` (the default CNN unless told), built by the trainer's own job builder; returns the
  canonical state as flat numpy (and the losses). `overrides`: more config fields."""
  config = _config(parallel_backend=backend, bn_mode=bn_mode, dtype=dtype, batch_size=GLOBAL_BATCH, model=model,
                   eval_batch_size=8 * num_devices, num_train_steps=100, **overrides)
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
  for b, s in zip(rows, jax.tree.leaves(synced), strict=True):
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


@pytest.mark.parametrize('num_devices', [1, 8])
def test_mlp_jit_matches_shard_map(num_devices):
  """jit over global arrays (global BatchNorm without an axis name) is the shard_map step, on 1 and 8 devices."""
  ref, ref_losses = _train(num_devices, model='mlp')
  got, losses = _train(num_devices, model='mlp', backend='jit')
  assert _max_diff(ref, got) < 1e-5
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_mlp_fsdp_matches_replicated():
  """FSDP (floor 0: every array with a divisible dimension is split) trains as the replicated state does."""
  ref, ref_losses = _train(8, model='mlp', backend='jit')
  stepper, raw = _train(8, model='mlp', backend='jit', shard_params='fsdp', fsdp_min_bytes=0, return_raw=True)
  kernel = raw.params['Dense_0']['kernel']  # [784, 64]: split on its 784 rows, 98 per device.
  assert kernel.sharding.shard_shape(kernel.shape) == (98, 64)
  assert raw.opt_state[0].trace['Dense_0']['kernel'].sharding.shard_shape(kernel.shape) == (98, 64)
  got, losses = _train(8, model='mlp', backend='jit', shard_params='fsdp', fsdp_min_bytes=0)
  assert _max_diff(ref, got) < 1e-5
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def _recipe(backend, num_devices, **overrides):
  """grad accumulation + EMA, k steps per dispatch, then an eval with eval_flip: params, EMA, losses, eval sums."""
  config = _config(parallel_backend=backend, batch_size=GLOBAL_BATCH, model='mlp', eval_batch_size=8 * num_devices,
                   num_train_steps=100, grad_accum_steps=2, ema_decay=0.8, eval_flip=True, **overrides)
  job = job_lib.build(config, mesh=mesh_lib.make_mesh(num_devices), data=_data())
  stepper = job.stepper
  state = stepper.to_device(job.initial_state())
  batches = _batches()
  state, _ = stepper.train_step(state, stepper.place(_local_rows(job.mesh, batches[0])))
  stacked = {k: np.stack([b[k] for b in batches[1:]]) for k in batches[0]}
  state, metrics = stepper.train_steps(state, stepper.place_steps(stacked))
  losses = stepper.metrics(metrics)['loss_sum']
  eval_batch = dict(_batches(k=1, batch=8 * num_devices, seed=1)[0], mask=np.ones(8 * num_devices, np.float32))
  sums = stepper.eval_step(stepper.eval_state(state), stepper.place(eval_batch))
  state = stepper.to_canonical(state)
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path((state.params, state.ema_params, state.batch_stats))}
  return flat, losses, sums


def test_jit_recipe_matches_shard_map():
  """Micro-batches, EMA, train_steps (lax.scan) and eval_flip under jit (and FSDP) = shard_map, 8 devices."""
  ref, ref_losses, ref_sums = _recipe('shard_map', 8)
  for overrides in ({}, dict(shard_params='fsdp', fsdp_min_bytes=0)):
    got, losses, sums = _recipe('jit', 8, **overrides)
    assert _max_diff(ref, got) < 1e-5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert set(sums) == set(ref_sums)
    for k in sums:
      np.testing.assert_allclose(sums[k], ref_sums[k], rtol=1e-5)


@pytest.mark.slow
def test_jit_cnn_eight_devices_match_one(one_device):
  """The default CNN (its CPU conv/BN kernels, no axis name) under jit, replicated and FSDP, vs shard_map."""
  ref, ref_losses = one_device
  for overrides in ({}, dict(shard_params='fsdp')):
    got, losses = _train(8, backend='jit', **overrides)
    assert _max_diff(ref, got) < 1e-5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.parametrize('model', ['vit_s', 'resnet50'])
def test_fsdp_state_bytes_per_device(model):
  """From abstract shapes only (nothing initialised): FSDP keeps at most 1/6 of the replicated state per device."""
  from models import create_model
  from parallel import sharding, state as state_lib
  from trainer import optim
  config = _config(model=model, ema_decay=0.999)
  mesh = mesh_lib.make_mesh(8)
  net = create_model(config, num_classes=1000)
  tx = optim.make_optimizer(config, 100)
  abstract = jax.eval_shape(lambda: state_lib.initial_state(mesh, net, tx, (224, 224, 3), 0, ema=True))
  replicated = sharding.bytes_per_device(abstract, sharding.state_shardings(abstract, mesh, 'none'))
  fsdp = sharding.bytes_per_device(abstract, sharding.state_shardings(abstract, mesh, 'fsdp'))
  params = sum(x.size * 4 for x in jax.tree.leaves(abstract.params))
  assert replicated >= 3 * params  # params, EMA, momentum
  assert fsdp <= replicated / 6, (fsdp, replicated)

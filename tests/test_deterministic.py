"""parallel/deterministic.py: fixed-order sums, statistics and BatchNorm gradients give the same bits on 1, 2, 4
and 8 devices (sub-meshes of the 8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from benchmarks import kit
from errors import UserError
from parallel import deterministic, mesh as mesh_lib
from trainer import checkpoints, config_check, job as job_lib

V = 8
COUNTS = (1, 2, 4, 8)


def _run(fn, n, *args, replicated=()):
  """fn(*per-device slices [V/n, ...], *replicated) under shard_map on the first n devices; replicated outputs to
  host. Pass weights through `replicated`, as the trainer does, not as closed-over constants: XLA folds constants
  (a zero bias) away in the unpartitioned program and keeps them in a partitioned one, and the two fusions round
  differently (seen with JAX 0.12 on the CPU)."""
  mesh = mesh_lib.make_mesh(n)
  placed = jax.device_put(args, mesh_lib.batch_sharding(mesh))
  placed += jax.device_put(tuple(replicated), mesh_lib.replicated(mesh))
  specs = (P(mesh_lib.AXIS),) * len(args) + (P(),) * len(replicated)
  out = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))(*placed)
  return jax.tree.map(np.asarray, out)


def _assert_same_bits(results):
  for n, r in zip(COUNTS[1:], results[1:], strict=True):
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(r), strict=True):
      assert np.array_equal(a, b), f'{n} devices differ from 1: max |diff| {np.max(np.abs(a - b))}'


def _data(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 10)


def test_tree_sum_order():
  x = jnp.asarray([1e8, 1.0, -1e8, 1.0, 3.0], jnp.float32)
  # ((1e8 + 1) + (-1e8 + 1)) + 3: both inner sums round the 1 away.
  assert float(deterministic.tree_sum(x)) == 3.0
  np.testing.assert_allclose(deterministic.tree_sum(_data((7, 5))), np.sum(np.asarray(_data((7, 5))), 0), rtol=1e-5)


def test_fixed_sum_same_bits_on_any_device_count():
  x = _data((V, 1000))
  results = [_run(deterministic.fixed_sum, n, x) for n in COUNTS]
  _assert_same_bits(results)
  np.testing.assert_allclose(results[0], np.sum(np.asarray(x), 0), rtol=1e-5)
  # psum of each device's own tree sum: the order follows the topology, and the bits do differ.
  plain = [_run(lambda s: lax.psum(deterministic.tree_sum(s), mesh_lib.AXIS), n, x) for n in COUNTS]
  assert any(not np.array_equal(plain[0], p) for p in plain[1:])


def test_fixed_sum_rejects_uneven_trees():
  with pytest.raises(ValueError, match='power of two'):
    _run(deterministic.fixed_sum, 2, _data((6, 3)))


def test_moments_same_bits_and_match_numpy():
  x = _data((V, 4, 3, 3, 16)) + 5
  results = [_run(deterministic.moments, n, x) for n in COUNTS]
  _assert_same_bits(results)
  flat = np.asarray(x).reshape(-1, 16)
  np.testing.assert_allclose(results[0][0], flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(results[0][1], flat.var(0), rtol=1e-4)


def test_batch_norm_gradients_same_bits():
  x, w = _data((V, 4, 3, 3, 16)), _data((V, 4, 3, 3, 16), seed=1)
  scale, bias = jnp.ones((V, 16)) * 1.5, jnp.full((V, 16), 0.25)

  def grads(x, w, scale, bias):
    def loss(x, scale, bias):
      y, _, _ = deterministic.batch_norm(x, scale, bias)
      # A local loss, per slice (elementwise ops on [V/n, ...] whole can round by shape); the gradient's
      # cross-device sums are inside batch_norm.
      return jnp.sum(deterministic.scan_slices(lambda a, b: jnp.sum(jnp.sin(a) * b), y, w))
    gx, gs, gb = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
    return lax.all_gather(gx, mesh_lib.AXIS, tiled=True), deterministic.fixed_sum((gs, gb))

  results = [_run(grads, n, x, w, scale, bias) for n in COUNTS]
  _assert_same_bits(results)

  def reference(x, scale, bias):  # plain jnp on the whole batch
    mean, var = x.reshape(-1, 16).mean(0), x.reshape(-1, 16).var(0)
    per_slice = (slice(None),) + (None,) * 3
    return jnp.sum(jnp.sin((x - mean) * lax.rsqrt(var + 1e-5) * scale[per_slice] + bias[per_slice]) * w)
  gx, gs, gb = jax.grad(reference, argnums=(0, 1, 2))(x, scale, bias)
  np.testing.assert_allclose(results[0][0], gx, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(results[0][1][0], gs.sum(0), rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(results[0][1][1], gb.sum(0), rtol=1e-3, atol=1e-3)


def test_scan_slices_gradients_same_bits():
  xs, ys = _data((V, 16, 12)), _data((V, 16, 3), seed=2)
  params = {'w': _data((12, 3), seed=3) / 10, 'b': jnp.zeros(3)}

  def per_device(xs, ys, params):
    def slice_grad(x, y):
      return jax.value_and_grad(lambda p: jnp.sum((jnp.tanh(x @ p['w'] + p['b']) - y) ** 2))(params)
    return deterministic.fixed_sum(deterministic.scan_slices(slice_grad, xs, ys))

  _assert_same_bits([_run(per_device, n, xs, ys, replicated=(params,)) for n in COUNTS])



# --- deterministic=True in the trainer's steps (in process, sub-meshes of the 8 simulated devices) ----------------



def _job_run(n, model='mlp', backend='shard_map', steps=4, hw=8, batch=32, **overrides):
  """`steps` train steps (one of them a 2-step `train_steps` dispatch) and one eval of the trainer's own job on
  n devices: (every leaf of the canonical state, the per-step train metrics, the eval sums), all numpy."""
  rng = np.random.default_rng(0)
  data = kit.dataset(n=batch, shape=(hw, hw, 1), test=8, images='zeros', labels='cycle')
  c = kit.config(small=True, **{**dict(model=model, parallel_backend=backend, batch_size=batch, eval_batch_size=batch,
                                      num_train_steps=100, deterministic=True, resnet_width=8, resnet_stages='1,1'),
                                 **overrides})
  job = job_lib.build(c, mesh=mesh_lib.make_mesh(n), data=data)
  stepper = job.stepper
  state = stepper.to_device(job.initial_state())
  lo, hi = mesh_lib.process_rows(job.mesh, batch)
  batches = [{'image': rng.random((batch, hw, hw, 1), dtype=np.float32)[lo:hi],
              'label': rng.integers(0, 10, batch).astype(np.int32)[lo:hi]} for _ in range(steps)]
  metrics = []
  for b in batches[:-2]:
    state, m = stepper.train_step(state, stepper.place(b))
    metrics.append(stepper.metrics(m))
  state, m = stepper.train_steps(state, stepper.place_steps({k: np.stack([b[k] for b in batches[-2:]])
                                                             for k in batches[0]}))
  metrics.append(stepper.metrics(m))
  eval_batch = dict(batches[0], mask=np.ones(hi - lo, np.float32))
  sums = stepper.eval_step(stepper.eval_state(state), stepper.place(eval_batch))
  state = jax.device_get(stepper.to_canonical(state))
  leaves = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
      (state.params, state.batch_stats, state.opt_state, state.ema_params))}
  return leaves, metrics, sums


def _assert_bits(ref, got, what):
  for part, a, b in zip(('state', 'train metrics', 'eval sums'), ref, got, strict=True):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b), (what, part)
    bad = [jax.tree_util.keystr(k) for (k, x), y in zip(flat_a, flat_b, strict=True) if not np.array_equal(x, y)]
    assert not bad, f'{what}: {part} differ from 1 device in {bad[:5]}'


RECIPE = dict(grad_accum_steps=2, ema_decay=0.8, eval_flip=True, label_smoothing=0.1)


@pytest.mark.slow  # ~45 s: in the full suite, not the quick loop.
def test_trainer_steps_same_bits_on_1_2_4_8_devices_and_every_backend():
  """The MLP (BatchNorm) with micro-batches, EMA, k steps per dispatch, eval_flip: params, BN statistics,
  optimizer state, EMA, train metrics and eval sums bitwise equal on 1, 2, 4, 8 devices under shard_map, pmap
  and jit (replicated and FSDP)."""
  ref = _job_run(1, **RECIPE)
  for n, backend, extra in ((2, 'shard_map', {}), (4, 'shard_map', {}), (8, 'shard_map', {}), (8, 'pmap', {}),
                            (2, 'pmap', {}), (4, 'jit', {}), (8, 'jit', dict(shard_params='fsdp', fsdp_min_bytes=0))):
    _assert_bits(ref, _job_run(n, backend=backend, **RECIPE, **extra), f'{n} devices {backend} {extra}')


def test_deterministic_math_is_the_plain_step():
  """The fixed order changes the rounding, not the math: within 1e-5 of the plain step (cpu_kernels off)."""
  det = _job_run(2, **RECIPE)
  plain = _job_run(2, **RECIPE, deterministic=False, cpu_kernels='off')
  for k in det[0]:
    np.testing.assert_allclose(det[0][k], plain[0][k], rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(det[1], plain[1], strict=True):
    np.testing.assert_allclose(a['loss_sum'], b['loss_sum'], rtol=1e-5)
  # And the plain step does round by topology, so the test above is not trivially passing.
  other = _job_run(8, **RECIPE, deterministic=False, cpu_kernels='off')
  assert any(not np.array_equal(plain[0][k], other[0][k]) for k in plain[0])


@pytest.mark.slow
@pytest.mark.parametrize('model, steps', [('cnn', 24), ('resnet18', 16)])
def test_cnn_and_resnet_keep_the_same_bits_over_many_steps(model, steps):
  """The default CNN (global BatchNorm) for 24 steps and a narrow ResNet on 8x8 images for 16: bits equal on
  1/4/8 devices (shard_map) and on pmap and jit (2 devices: test_trainer_steps_same_bits_on_1_2_4_8_devices)."""
  ref = _job_run(1, model=model, steps=steps)
  for n, backend in ((4, 'shard_map'), (8, 'shard_map'), (8, 'pmap'), (4, 'jit')):
    _assert_bits(ref, _job_run(n, model=model, backend=backend, steps=steps), f'{model} {n} devices {backend}')


@pytest.mark.parametrize('overrides, match', [
    (dict(virtual_shards=6), 'power of two'),
    (dict(batch_size=100), 'virtual_shards=8 equal slices'),
    (dict(batch_size=64, grad_accum_steps=16), 'use a multiple of 128'),
    (dict(eval_batch_size=1001), 'eval_batch_size'),
    (dict(bn_mode='local'), 'bn_mode=global'),
])
def test_config_refusals(overrides, match):
  c = kit.config(deterministic=True, **overrides)
  with pytest.raises(UserError, match=match) as e:
    config_check.validate(c)
  assert '\n' not in str(e.value)


def test_defaults_allow_1_2_4_8_devices_at_batch_128_and_64():
  for batch in (128, 64):
    c = kit.config(deterministic=True, batch_size=batch)
    config_check.validate(c)
    assert all(c.virtual_shards % n == 0 and batch % c.virtual_shards == 0 for n in (1, 2, 4, 8))


def test_device_count_that_does_not_divide_the_shards_is_refused():
  data = kit.dataset(n=32, shape=(8, 8, 1), test=8, images='zeros', labels='cycle')
  c = kit.config(model='mlp', deterministic=True, virtual_shards=2, batch_size=32, eval_batch_size=32)
  with pytest.raises(UserError, match='do not split over 4 devices: use a device count that divides 2 \\(1, 2\\)'):
    job_lib.build(c, mesh=mesh_lib.make_mesh(4), data=data)


def test_fingerprint_records_the_reduction_order():
  c = kit.config()
  plain = {'reduction_order': checkpoints.reduction_order(c)}
  c.deterministic = True
  eight = {'reduction_order': checkpoints.reduction_order(c)}
  c.virtual_shards = 16
  sixteen = {'reduction_order': checkpoints.reduction_order(c)}
  shapes = {'model': 'cnn', 'dataset': 'd', 'optimizer': 'sgd', 'shapes': {}, 'data': {'classes': []}}
  fp = lambda extra: dict(shapes, **extra)
  assert checkpoints._describe_mismatch(fp(eight), fp(eight)) == ''
  assert 'virtual_shards=8' in checkpoints._describe_mismatch(fp(eight), fp(sixteen))
  assert 'topology' in checkpoints._describe_mismatch(fp(plain), fp(eight))
  assert checkpoints._describe_mismatch(shapes, fp(plain)) == ''  # Older checkpoints: sums in topology order.

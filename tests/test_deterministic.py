"""parallel/deterministic.py: fixed-order sums, statistics and BatchNorm gradients give the same bits on 1, 2, 4
and 8 devices (sub-meshes of the 8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from parallel import deterministic, mesh as mesh_lib

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
  for n, r in zip(COUNTS[1:], results[1:]):
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(r)):
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

"""Fixed-order reductions over V virtual shards: the same bits on any number of devices.

A cross-device `psum` adds the devices' partial sums in an order that depends on the topology, so 2 and 8
devices drift apart (float addition is not associative). Here the global batch is cut into V equal slices
whatever the device count n (V a power of two, n dividing V); each device holds V/n consecutive slices, computes
each slice's result with the same program (`scan_slices`), and the V results are added in one fixed binary tree
(`fixed_sum`): adjacent pairs first, so each device's slices form whole subtrees; the device-local subtree sums
are all-gathered and the same top of the tree is added everywhere. XLA's CPU runtime gives a slice program the
same bits under 1, 2, 4 and 8 simulated devices when the program itself does not depend on the device count
(docs: docs_pending/determ.md). Used inside `jax.shard_map` over the mesh's `data` axis.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from parallel.mesh import AXIS


def tree_sum(x, axis: int = 0):
  """Sum over `axis` (static length) as a binary tree of adjacent pairs: ((x0+x1)+(x2+x3))+...; an odd last
  element waits for the next level. The order depends only on the length."""
  x = jnp.moveaxis(x, axis, 0)
  while x.shape[0] > 1:
    m = x.shape[0] // 2 * 2
    pairs = x[0:m:2] + x[1:m:2]
    x = jnp.concatenate([pairs, x[m:]]) if m < x.shape[0] else pairs
  return x[0]


def _check_pow2(v: int, what: str) -> None:
  if v < 1 or v & (v - 1):
    raise ValueError(f'{what}={v} must be a power of two for a topology-independent sum')


def fixed_sum(local, axis_name: str = AXIS):
  """Total over all V slices of per-slice values stacked [V/n, ...] on each device (a pytree), in the fixed tree
  of `tree_sum` over V: device-local subtrees, then an all-gather of the n subtree sums and the same top of the
  tree everywhere. The result is replicated. Not for differentiation (autodiff's transpose of the all-gather is
  a topology-ordered psum_scatter): gradients, metrics, statistics with their own backward (`batch_norm`)."""
  n = lax.psum(1, axis_name)
  _check_pow2(n, 'devices')

  def one(x):
    _check_pow2(x.shape[0], 'slices per device')
    part = tree_sum(x)
    return tree_sum(lax.all_gather(part, axis_name)) if n > 1 else part
  return jax.tree.map(one, local)


def scan_slices(fn, *slices):
  """fn(*one_slice) for each of this device's slices (leading axis of every leaf), stacked [V/n, ...]:
  one program for every slice, so its bits do not depend on how many slices a device holds (one slice per
  device runs twice: see `_map`)."""
  return _map(lambda xs: fn(*xs), slices)


def _map(fn, xs):
  """fn over the leading axis in a loop of at least two trips: XLA simplifies a one-trip loop (n = V: one slice
  per device) away and then fuses its body otherwise, which changes the bits (seen on the CPU; unrolling is no
  cure, straight-line copies are fused otherwise too). One slice runs twice instead."""
  one = jax.tree.leaves(xs)[0].shape[0] == 1
  if one:
    xs = jax.tree.map(lambda a: jnp.concatenate([a, a]), xs)
  ys = lax.map(fn, xs)
  return jax.tree.map(lambda a: a[:1], ys) if one else ys


def _slice_sums(fn, *args):
  """Per-slice, per-channel sums [V/n, k, C] of the k parts fn(*one_slice) returns, one slice at a time. The
  parts are computed inside the loop: computed outside, XLA fuses them into the sums in another way when the
  loop has one trip (8 devices x 1 slice) and the bits change."""
  def one(xs):
    return jnp.stack([p.sum(axis=tuple(range(p.ndim - 1))) for p in fn(*xs)])
  return _map(one, args)


def moments(x, axis_name: str = AXIS):
  """(mean, var) per channel over all V slices of x [V/n, S, ..., C] in float32, fixed order: E[x^2] - E[x]^2
  clipped at 0, as flax's BatchNorm. Forward only (see `batch_norm` for a gradient)."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  count = x.size // x.shape[-1] * lax.psum(1, axis_name)
  mean, mean2 = fixed_sum(_slice_sums(lambda v: (v, v * v), xf), axis_name) / count
  return mean, jnp.maximum(0.0, mean2 - mean * mean)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm(x, scale, bias, epsilon: float = 1e-5, axis_name: str = AXIS):
  """(y, mean, var): x [V/n, S, ..., C] normalised with its global batch statistics (`moments`), y =
  (x - mean) * (rstd * scale) + bias. The backward pass needs global sums too; they take the same fixed order,
  from per-slice sums, so the input gradient is topology-independent as well. `scale` and `bias` come per
  slice, [V/n, C] (the caller stacks the replicated params, outside the gradient: the transpose of a broadcast
  would sum the slices in XLA's order), so their gradients are per slice too, ready for `fixed_sum`.
  Callers stop the gradients of mean and var (they feed only running averages)."""
  return _bn_forward(x, scale, bias, epsilon, axis_name)[0]


def _bn_forward(x, scale, bias, epsilon, axis_name):
  mean, var = moments(x, axis_name)
  rstd = lax.rsqrt(var + epsilon)
  y = _map(lambda a: (a[0] - mean) * (rstd * a[1]) + a[2], (x, scale, bias))  # per slice, as the sums
  return (y.astype(x.dtype), mean, var), (x, mean, rstd, scale)


def _bn_backward(epsilon, axis_name, residuals, cotangents):
  del epsilon
  x, mean, rstd, scale = residuals
  g = cotangents[0].astype(mean.dtype)
  local = _slice_sums(lambda gs, xs: (gs, gs * ((xs - mean) * rstd)), g, x)  # [V/n, 2, C]
  totals = fixed_sum(local, axis_name)
  n = x.size // x.shape[-1] * lax.psum(1, axis_name)
  dx = _map(lambda a: (rstd * a[2]) * (a[0] - totals[0] / n - (a[1] - mean) * rstd * (totals[1] / n)),
               (g, x, scale))
  return dx.astype(x.dtype), local[:, 1].astype(scale.dtype), local[:, 0].astype(scale.dtype)



batch_norm.defvjp(_bn_forward, _bn_backward)

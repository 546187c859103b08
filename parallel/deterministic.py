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

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from errors import UserError, setting
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


def split_slices(x, per: int):
  """[rows, ...] -> [per, rows / per, ...]: this device's rows as its `per` consecutive slices."""
  return x.reshape((per, x.shape[0] // per) + x.shape[1:])


def _at(tree, path):
  """The subtree of nested dicts `tree` at module `path`, or None."""
  for name in path:
    if not isinstance(tree, dict) or name not in tree:
      return None
    tree = tree[name]
  return tree


class SliceWise:
  """An `nn.intercept_methods` interceptor that runs a flax model slice by slice, with fixed-order BatchNorm.

  The model's own code (glue between modules: ReLU, pooling, reshapes, residual adds) sees this device's whole
  block of rows; every module call whose variables hold no `batch_stats` runs per slice instead (a `_map`
  over the `per` slices, each an unbound `apply` with that slice's copy of the params), and `nn.BatchNorm`
  runs as `batch_norm` (global statistics and backward sums in fixed order, running averages updated as
  flax does). `stacked` holds the params broadcast to [per, ...] outside the gradient, so the gradients come
  out per slice for `fixed_sum`. A model without BatchNorm is one per-slice call of the whole model.
  `check_covered` refuses a model whose params the per-slice calls did not all reach (params owned by a
  module that also holds a BatchNorm would get their gradient summed in XLA's order).
  """

  def __init__(self, stacked, batch_stats, per: int, key=None, first_slice=0):
    self.stacked, self.batch_stats, self.per, self.key, self.first = stacked, batch_stats, per, key, first_slice
    self.covered = set()
    self._inside = 0

  def __call__(self, next_fun, args, kwargs, context):
    m = context.module
    if self._inside or context.method_name != '__call__' or m.is_initializing():
      return next_fun(*args, **kwargs)
    path = tuple(m.scope.path)
    if isinstance(m, nn.BatchNorm):
      return self._batch_norm(next_fun, m, path, *args, **kwargs)
    stats = _at(self.batch_stats, path)
    if stats:
      if any(not isinstance(v, dict) for v in stats.values()):
        raise UserError(f'{setting("deterministic")}=True supports flax.linen.BatchNorm only, but module '
                        f'{"/".join(path) or type(m).__name__} ({type(m).__name__}) keeps batch statistics of its '
                        'own: use nn.BatchNorm in the model, or deterministic=False')
      return next_fun(*args, **kwargs)  # Holds a BatchNorm deeper down: its own code runs on the whole block.
    self.covered.add(path)
    return self._per_slice(m, path, args, kwargs)

  def _per_slice(self, m, path, args, kwargs):
    x, rest = args[0], args[1:]
    rows = x.shape[0]
    params = _at(self.stacked, path) or {}
    unbound = m.clone(parent=None)

    def one(a):
      p, xs, i = a
      rngs = {'dropout': jax.random.fold_in(self.key, i)} if self.key is not None else None
      self._inside += 1
      try:
        return unbound.apply({'params': p} if p else {}, xs, *rest, rngs=rngs, **kwargs)
      finally:
        self._inside -= 1
    ys = _map(one, (params, split_slices(x, self.per), self.first + jnp.arange(self.per)))
    return jax.tree.map(lambda y: y.reshape((rows,) + y.shape[2:]), ys)

  def _batch_norm(self, next_fun, m, path, x, use_running_average=None, *, mask=None):
    if nn.merge_param('use_running_average', m.use_running_average, use_running_average):
      return next_fun(x, use_running_average, mask=mask)
    if mask is not None or m.axis not in (-1, x.ndim - 1) or m.axis_index_groups is not None or \
        not m.use_fast_variance:
      raise UserError(f'{setting("deterministic")}=True supports nn.BatchNorm over the last axis (no mask, '
                      f'axis_index_groups or use_fast_variance=False); module {"/".join(path)} uses another form: '
                      'change the model, or use deterministic=False')
    self.covered.add(path)
    params = _at(self.stacked, path) or {}
    c = x.shape[-1]
    scale = params['scale'] if m.use_scale else jnp.ones((self.per, c), jnp.float32)
    bias = params['bias'] if m.use_bias else jnp.zeros((self.per, c), jnp.float32)
    y, mean, var = batch_norm(split_slices(x, self.per), scale, bias, m.epsilon)
    ra_mean, ra_var = m.get_variable('batch_stats', 'mean'), m.get_variable('batch_stats', 'var')
    m.put_variable('batch_stats', 'mean', m.momentum * ra_mean + (1 - m.momentum) * lax.stop_gradient(mean))
    m.put_variable('batch_stats', 'var', m.momentum * ra_var + (1 - m.momentum) * lax.stop_gradient(var))
    return y.reshape(x.shape).astype(m.dtype or x.dtype)

  def check_covered(self, params) -> None:
    """Every param must belong to a per-slice module or a BatchNorm (see the class doc)."""
    for keys, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
      names = tuple(str(getattr(k, 'key', k)) for k in keys)
      if not any(names[:i] in self.covered for i in range(len(names))):
        raise UserError(f'{setting("deterministic")}=True cannot sum the gradient of param {"/".join(names)} in '
                        'fixed order: it belongs to a module that also holds a BatchNorm; move it into a '
                        'submodule of its own (e.g. an nn.Dense or a self.param in a small module), or use '
                        'deterministic=False')

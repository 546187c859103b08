"""BatchNorm (+ ReLU, + 2x2 average pool) with its backward pass written out: flax's math, fewer memory passes.

Why: on the CPU, BatchNorm is the seed CNN's costliest part after the convolutions. With BatchNorm taken out
of the default job's step (an experiment, not a model) the step ran ~22% faster. XLA's automatic derivative
of `avg_pool(relu(BatchNorm(x)))` materialises about eight tensors of the first layer's size per step (the
normalised output, x - mean, the ReLU mask, the masked gradient, scaled copies, and two constant tensors fed
to the pooling and ReLU kernels), each a memory-bound pass. Written by hand (`jax.custom_vjp`), the forward
pass is the statistics' reductions and one loop that normalises, applies the ReLU and pools (four strided
slices, which fuse with their producer where a reduce-window does not); the backward pass recomputes the
ReLU mask from x instead of storing it. `conv_batch_norm` also hands the convolution's bias to the BatchNorm,
where it cancels, instead of adding it in a pass of its own. Measured in paired windows on the 2-core AMD EPYC
VM, default job (2 devices x 64): see the README's "Performance".

Same math as `flax.linen.BatchNorm`, then `nn.relu`, then `nn.avg_pool(2x2, stride 2, VALID)` (tested
against them, values and gradients, one and several devices): statistics in float32 over the batch (and over
`axis_name`, as flax's `pmean`), E[x^2] - E[x]^2 clipped at 0, running averages `momentum * old + (1 -
momentum) * batch`, variables `params/{scale,bias}` and `batch_stats/{mean,var}` under the same module
names, so checkpoints move freely between `bn_impl` settings.

The input gradient is that of the loss summed over the devices that share the statistics, as the step's
`pmean` of gradients expects from flax's version (the transpose of `psum` is `psum`):
  dx = a * (gy - S[gy] / N - x_hat * S[gy * x_hat] / N),   a = scale / sqrt(var + eps),
with S a sum over the global batch (N values per channel) and gy the incoming gradient, spread back over each
pooling window and masked by the ReLU.

Only the CPU is known to gain: `bn_impl='auto'` keeps flax's BatchNorm on GPU and TPU, whose compilers fuse
it well and where it has not been measured.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ('auto', 'flax', 'fused')


def resolve(impl: str, platform: Optional[str] = None) -> str:
  """'auto' -> 'fused' on the CPU, 'flax' elsewhere."""
  if impl == 'auto':
    return 'fused' if (platform or jax.default_backend()) == 'cpu' else 'flax'
  return impl


def batch_norm(impl: str, *, relu: bool = False, pool: bool = False, **kw) -> Callable:
  """`x -> [avg_pool 2x2](relu?(BatchNorm(**kw)(x)))`, built inside the caller's `nn.compact` scope.

  Either implementation creates one module named `BatchNorm_<i>` in the caller, with the same variables.
  """
  if resolve(impl) == 'fused':
    return BatchNorm(relu=relu, pool=pool, **kw)
  norm = nn.BatchNorm(**kw)

  def apply(x):
    y = norm(x)
    y = nn.relu(y) if relu else y
    return nn.avg_pool(y, (2, 2), strides=(2, 2)) if pool else y
  return apply


def conv_batch_norm(impl: str, features: int, kernel_size, *, conv: Callable, dtype, relu: bool = False,
                    pool: bool = False, **kw) -> Callable:
  """`x -> batch_norm(impl, relu, pool, **kw)(nn.Conv(features, kernel_size, 'SAME')(x))`: modules named
  `Conv_<i>` and `BatchNorm_<i>` in the caller, the same variables under either implementation. With
  `fused`, the convolution's bias goes to the BatchNorm (where it cancels) instead of a pass of its own."""
  if resolve(impl) == 'fused':
    conv_module = Conv(features, tuple(kernel_size), dtype=dtype, conv_general_dilated=conv)
    norm = BatchNorm(relu=relu, pool=pool, dtype=dtype, **kw)
    return lambda x: norm(*conv_module(x))
  conv_module = nn.Conv(features, kernel_size, dtype=dtype, param_dtype=jnp.float32, conv_general_dilated=conv)
  norm = batch_norm(impl, relu=relu, pool=pool, dtype=dtype, **kw)
  return lambda x: norm(conv_module(x))


class Conv(nn.Module):
  """`nn.Conv(features, kernel_size)` (stride 1, SAME padding, NHWC) with the same parameters and initial
  values, returning (x conv kernel, bias) for a `BatchNorm` to add the bias where it cancels."""
  features: int
  kernel_size: tuple
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_general_dilated: Callable = lax.conv_general_dilated

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), self.kernel_size + (x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = self.conv_general_dilated(x, kernel, (1,) * len(self.kernel_size), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y, bias


def pool2x2(y):
  """2x2 average pooling, stride 2, VALID (a trailing odd row or column is dropped) as four strided slices."""
  h, w = y.shape[1] // 2 * 2, y.shape[2] // 2 * 2
  return 0.25 * ((y[:, 0:h:2, 0:w:2] + y[:, 1:h:2, 0:w:2]) + (y[:, 0:h:2, 1:w:2] + y[:, 1:h:2, 1:w:2]))


def unpool2x2(g, shape):
  """The transpose of `pool2x2`: each gradient spread over its 2x2 window (times 1/4), zero on a dropped edge."""
  n, h2, w2, c = g.shape
  up = jnp.broadcast_to((0.25 * g)[:, :, None, :, None, :], (n, h2, 2, w2, 2, c)).reshape(n, 2 * h2, 2 * w2, c)
  return jnp.pad(up, ((0, 0), (0, shape[1] - 2 * h2), (0, shape[2] - 2 * w2), (0, 0)))


def _float32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _pre_activation(x, mean, rstd, scale, bias):
  """flax's normalisation, in its order of operations: (x - mean) * (rstd * scale) + bias."""
  return (x - mean) * (rstd * scale) + bias


def _sums(parts, axis_name):
  """Per-channel sums of each part over this device's rows and pixels, and the same summed over `axis_name`."""
  local = jnp.stack([p.sum(axis=tuple(range(p.ndim - 1))) for p in parts])
  return local, (lax.psum(local, axis_name) if axis_name else local)


def _count(x, axis_name):
  n = x.size // x.shape[-1]
  return n * lax.psum(1, axis_name) if axis_name else n


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def batch_norm_train(x, shift, scale, bias, epsilon: float, axis_name: Optional[str], relu: bool, pool: bool):
  """(y, mean, var): x + shift normalised with its batch's float32 statistics, then ReLU (`relu`) and 2x2
  average pooling (`pool`). Callers stop the gradients of `mean` and `var` (they feed only the running
  averages).

  `shift` (per channel; the bias of the convolution before, `Conv`) cancels in the normalisation: only the
  statistics see it, so x + shift is never materialised. Its gradient, the per-channel sum of this device's
  input gradient (zero in exact arithmetic), comes from per-channel sums already at hand."""
  return _forward(x, shift, scale, bias, epsilon, axis_name, relu, pool)[0]


def _forward(x, shift, scale, bias, epsilon, axis_name, relu, pool):
  xf = _float32(x)
  local, totals = _sums((xf, xf * xf), axis_name)
  mean, mean2 = totals / _count(xf, axis_name)
  var = jnp.maximum(0.0, mean2 - mean * mean)
  rstd = lax.rsqrt(var + epsilon)
  y = _pre_activation(xf, mean, rstd, scale, bias)
  y = jnp.maximum(y, 0.0) if relu else y
  y = pool2x2(y) if pool else y
  return (y.astype(x.dtype), mean + shift, var), (x, shift, mean, rstd, scale, bias, local[0])


def _backward(epsilon, axis_name, relu, pool, residuals, cotangents):
  del epsilon
  x, shift, mean, rstd, scale, bias, x_sum = residuals
  xf = _float32(x)
  g = cotangents[0].astype(xf.dtype)  # cotangents[1:] (mean, var) are zero: the callers stop them.
  g = unpool2x2(g, x.shape) if pool else g
  if relu:
    g = jnp.where(_pre_activation(xf, mean, rstd, scale, bias) > 0, g, 0.0)
  x_hat = (xf - mean) * rstd
  local, totals = _sums((g, g * x_hat), axis_name)
  n, n_local = _count(xf, axis_name), xf.size // xf.shape[-1]
  a = rstd * scale
  dx = a * (g - totals[0] / n - x_hat * (totals[1] / n))
  x_hat_sum = rstd * (x_sum - n_local * mean)
  d_shift = a * (local[0] - n_local * totals[0] / n - x_hat_sum * (totals[1] / n))  # = sum of dx here
  return (dx.astype(x.dtype), d_shift.astype(shift.dtype), local[1].astype(scale.dtype),
          local[0].astype(bias.dtype))


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis, optionally followed by a ReLU (`relu`) and a 2x2 stride-2
  average pool (`pool`), differentiated by `batch_norm_train`'s hand-written backward pass in training."""
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros
  relu: bool = False
  pool: bool = False

  @nn.compact
  def __call__(self, x, shift=None):
    """`shift`: a per-channel bias to add to x first (`Conv`'s, which it leaves to this module)."""
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param('scale', self.scale_init, features, self.param_dtype)
    bias = self.param('bias', self.bias_init, features, self.param_dtype)
    dtype = self.dtype or x.dtype
    shift = jnp.zeros(features, jnp.float32) if shift is None else _float32(shift)
    if self.use_running_average:
      y = _pre_activation(_float32(x) + shift, ra_mean.value, lax.rsqrt(ra_var.value + self.epsilon), scale, bias)
      y = jnp.maximum(y, 0.0) if self.relu else y
      return (pool2x2(y) if self.pool else y).astype(dtype)
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = batch_norm_train(x, shift, scale, bias, self.epsilon, axis_name, self.relu, self.pool)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * lax.stop_gradient(mean)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * lax.stop_gradient(var)
    return y.astype(dtype)

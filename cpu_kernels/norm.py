"""BatchNorm in training with its backward pass written out: flax's math, fewer memory passes.

Why: on the CPU, BatchNorm is the seed CNN's costliest part after the convolutions. XLA's automatic
derivative of flax's BatchNorm materialises several tensors of the layer's size per step (the normalised
output, x - mean, scaled copies), each a memory-bound pass. Written by hand (`jax.custom_vjp`), the forward pass
is the statistics' reductions and one normalising loop, and the backward pass two per-channel reductions and
one loop. A convolution's bias, which the normalisation cancels, enters only the statistics (`shift`), so the
biased convolution output is never materialised. The ReLU and pooling after the BatchNorm stay the model's
(plain `nn.relu`, `nn.avg_pool`): an interceptor sees module calls, not the functions applied to their results.

Same math as `flax.linen.BatchNorm(use_fast_variance=True)`, the default (tested against it, values and
gradients, one and several devices): statistics in float32 over the batch (and over `axis_name`, as flax's
`pmean`), E[x^2] - E[x]^2 clipped at 0, running averages `momentum * old + (1 - momentum) * batch`, the
module's own variables `params/{scale,bias}` and `batch_stats/{mean,var}`.

The input gradient is that of the loss summed over the devices that share the statistics, as the step's
`pmean` of gradients expects from flax's version (the transpose of `psum` is `psum`):
  dx = a * (gy - S[gy] / N - x_hat * S[gy * x_hat] / N),   a = scale / sqrt(var + eps),
with S a sum over the global batch (N values per channel) and gy the incoming gradient.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from jax import lax


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def batch_norm_train(x, shift, scale, bias, epsilon: float, axis_name: str | None):
  """(y, mean, var): x + shift normalised with its batch's float32 statistics over the last axis. Callers
  stop the gradients of `mean` and `var` (they feed only the running averages).

  `shift` (per channel; the bias of the convolution before) cancels in the normalisation: only the statistics
  see it, so x + shift is never materialised. Its gradient, the per-channel sum of this device's input
  gradient (zero in exact arithmetic), comes from per-channel sums already at hand."""
  return _forward(x, shift, scale, bias, epsilon, axis_name)[0]


def _forward(x, shift, scale, bias, epsilon, axis_name):
  xf = _float32(x)
  local, totals = _sums((xf, xf * xf), axis_name)
  mean, mean2 = totals / _count(xf, axis_name)
  var = jnp.maximum(0.0, mean2 - mean * mean)
  rstd = lax.rsqrt(var + epsilon)
  y = _pre_activation(xf, mean, rstd, scale, bias)
  return (y, mean + shift, var), (x, shift, mean, rstd, scale, bias, local[0])


def _backward(epsilon, axis_name, residuals, cotangents):
  del epsilon
  x, shift, mean, rstd, scale, bias, x_sum = residuals
  xf = _float32(x)
  g = cotangents[0].astype(xf.dtype)  # cotangents[1:] (mean, var) are zero: the callers stop them.
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


def _plain_module(m: nn.BatchNorm, x) -> bool:
  """True for the nn.BatchNorm settings `batch_norm_train` reproduces (flax's defaults, any axis_name)."""
  return (m.axis in (-1, getattr(x, 'ndim', 0) - 1) and getattr(x, 'ndim', 0) >= 2 and m.use_bias and m.use_scale
          and m.axis_index_groups is None and m.use_fast_variance and m.force_float32_reductions)


def intercept_batch_norm(next_fun, args, kwargs, m: nn.BatchNorm, handoff):
  """`nn.BatchNorm.__call__` in training with the hand-written backward pass, on the module's own variables
  (created in flax's order). Initialisation, running averages (eval) and other settings run flax's code.
  `handoff` (conv.Handoff) gives the bias of a Conv whose output `x` is."""
  x = args[0] if args else kwargs.get('x')
  use_running_average = kwargs.get('use_running_average', args[1] if len(args) > 1 else None)
  use_running_average = nn.merge_param('use_running_average', m.use_running_average, use_running_average)
  if (use_running_average or m.is_initializing() or kwargs.get('mask') is not None or len(args) > 2
      or not _plain_module(m, x)):
    return next_fun(*args, **kwargs)
  features = (x.shape[-1],)
  ra_mean = m.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features)
  ra_var = m.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features)
  scale = m.param('scale', m.scale_init, features, m.param_dtype)
  bias = m.param('bias', m.bias_init, features, m.param_dtype)
  y_in, shift = handoff.take(x)
  shift = jnp.zeros(features, jnp.float32) if shift is None else _float32(shift)
  y, mean, var = batch_norm_train(y_in, shift, scale, bias, m.epsilon, m.axis_name)
  ra_mean.value = m.momentum * ra_mean.value + (1 - m.momentum) * lax.stop_gradient(mean)
  ra_var.value = m.momentum * ra_var.value + (1 - m.momentum) * lax.stop_gradient(var)
  return y.astype(dtypes.canonicalize_dtype(x, scale, bias, dtype=m.dtype))

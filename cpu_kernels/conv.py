"""Convolution whose kernel gradient is an explicit im2col matmul: the same math, a faster CPU schedule.

Why: XLA's CPU backend computes a convolution's kernel gradient (the "backward filter" convolution) at a
small share of the machine's matmul rate, and it slows down more than linearly with the batch. Profiled on
the 2-core AMD EPYC VM, the seed CNN at batch 128 on one device: the 32->64 conv's kernel gradient took
44-53 ms of a ~140 ms step, its forward 13 ms. Written as a matmul, dW[kh, kw, ci, co] = sum over (n, h, w)
of x_pad[n, h*s + kh, w*s + kw, ci] * g[n, h, w, co], i.e. im2col(x)^T @ g, it runs 2-3x faster, and
faster still when the batch is cut into chunks by a `lax.scan` so that each chunk's im2col block stays in
cache (measured: 18.6 vs 44.4 ms at batch 128). Whole training steps, 2 simulated devices x 64: the default CNN
~1,450-1,530 -> ~1,810-1,990 img/s, the narrow Fashion-MNIST ResNet 325 -> 340-430 img/s.
The forward pass and the input gradient stay XLA's own convolution: the same chunked matmul for them won in
isolation (7.8 -> 6.3 ms) but lost in the whole step (1,800 -> 1,200 img/s; it blocks XLA's fusions), so it
was dropped. Only the order of the kernel gradient's float sums changes (relative difference ~1e-6).

Only the CPU gains: cuDNN and the TPU compiler have fast kernel gradients of their own (`cpu_kernels='auto'`
plugs this in on the CPU only). `intercept_conv` runs a plain `nn.Conv` this way, and leaves its bias to a
BatchNorm that directly follows it (`Handoff`, norm.py).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# im2col bytes per scan chunk: about a core's L2. Measured on the AMD VM, default CNN on 2 devices x 64:
# 0.5-1 MiB ~1,800-1,980 img/s, 2 MiB 1,530-1,790, 4 MiB 1,230-1,280, no chunking 1,190.
CHUNK_BYTES = 1 << 20


def _plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count):
  """True for the case the matmul gradient handles: 2-D NHWC x HWIO, no dilation, no groups."""
  if lhs.ndim != 4 or feature_group_count != 1:
    return False
  if any(d != 1 for d in (lhs_dilation or (1, 1))) or any(d != 1 for d in (rhs_dilation or (1, 1))):
    return False
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  got = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return got == want


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated`'s signature; plain NHWC convolutions get the matmul kernel gradient."""
  if kwargs or not _plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision, **kwargs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return _conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), precision)


def _xla_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
  return _xla_conv(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, precision):
  return _xla_conv(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, res, g):
  x, w = res
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding, precision), x)
  (dx,) = input_vjp(g)
  return dx, kernel_grad(x, g, w.shape, strides, padding).astype(w.dtype)


def _im2col(x, kernel_hw, strides, padding, out_hw):
  """(n, ho, wo, kh*kw*ci): the input windows each output pixel saw, in HWIO kernel order."""
  (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  return jnp.concatenate([lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1,
                                                       xp.shape[3]), (1, sh, sw, 1))
                          for i in range(kh) for j in range(kw)], axis=-1)


def _chunk(batch: int, per_image_bytes: int) -> int:
  """The largest divisor of `batch` whose im2col block fits CHUNK_BYTES (at least 1)."""
  best = 1
  for c in range(1, batch + 1):
    if batch % c == 0 and c * per_image_bytes <= CHUNK_BYTES:
      best = c
  return best


def kernel_grad(x, g, w_shape, strides, padding):
  """dL/dW (HWIO) of a NHWC convolution as a sum over batch chunks of im2col(x_chunk)^T @ g_chunk."""
  kh, kw, ci, co = w_shape
  n, ho, wo, _ = g.shape
  k = kh * kw * ci
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  c = _chunk(n, ho * wo * k * x.dtype.itemsize)

  def chunk_grad(xc, gc):
    cols = _im2col(xc, (kh, kw), strides, padding, (ho, wo)).reshape(-1, k)
    return lax.dot_general(cols, gc.reshape(-1, co), (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)

  if c == n:
    dw = chunk_grad(x, g)
  else:
    xs = x.reshape((n // c, c) + x.shape[1:])
    gs = g.reshape((n // c, c) + g.shape[1:])
    dw, _ = lax.scan(lambda acc, xg: (acc + chunk_grad(*xg), None), jnp.zeros((k, co), acc_dtype), (xs, gs))
  return dw.reshape(w_shape)


_conv.defvjp(_conv_fwd, _conv_bwd)


class Handoff:
  """Conv outputs `y + bias` by identity, with their `y` and `bias`: a BatchNorm whose input is one of them
  normalises `y` with `bias` as a shift, so that `y + bias` is never materialised unless something else reads
  it (XLA then drops the unused add). Kept for one trace (`cpu_kernels.intercepted`); holding the outputs keeps
  their ids unique."""

  def __init__(self):
    self._items = {}

  def put(self, out, y, bias):
    self._items[id(out)] = (out, y, bias)

  def take(self, x):
    """(y, bias) where `x` is a Conv output put here, else (x, None)."""
    item = self._items.get(id(x))
    return (item[1], item[2]) if item is not None and item[0] is x else (x, None)


def _ones(value) -> bool:
  return value is None or all(v == 1 for v in ((value,) if isinstance(value, int) else value))


def _plain_padding(padding) -> bool:
  if isinstance(padding, str):
    return padding in ('SAME', 'VALID')
  return (isinstance(padding, (tuple, list)) and len(padding) == 2
          and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in padding))


def _plain_module(m: nn.Conv, x) -> bool:
  """True for the nn.Conv settings `intercept_conv` reproduces: 2-D NHWC, no dilation, groups, mask or
  custom convolution."""
  return (getattr(x, 'ndim', 0) == 4 and len(tuple(m.kernel_size)) == 2 and m.feature_group_count == 1
          and _ones(m.input_dilation) and _ones(m.kernel_dilation) and m.mask is None
          and m.conv_general_dilated is None and m.conv_general_dilated_cls is None and _plain_padding(m.padding)
          and (m.strides is None or isinstance(m.strides, int) or len(m.strides) == 2))


def intercept_conv(next_fun, args, kwargs, m: nn.Conv, handoff: Handoff):
  """`nn.Conv.__call__` with the matmul kernel gradient; the same parameters (names, shapes, initialisers, in
  flax's order) and dtype promotion. Settings it does not reproduce run flax's own code."""
  x = args[0] if args else kwargs.get('inputs')
  if len(args) + len(kwargs) != 1 or not _plain_module(m, x):
    return next_fun(*args, **kwargs)
  kernel = m.param('kernel', m.kernel_init, tuple(m.kernel_size) + (x.shape[-1], m.features), m.param_dtype)
  bias = m.param('bias', m.bias_init, (m.features,), m.param_dtype) if m.use_bias else None
  x, kernel, bias = m.promote_dtype(x, kernel, bias, dtype=m.dtype)
  strides = m.strides if m.strides is not None else 1
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  padding = m.padding if isinstance(m.padding, str) else tuple(tuple(p) for p in m.padding)
  y = conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                           precision=m.precision)
  if bias is None:
    return y
  out = y + bias
  handoff.put(out, y, bias)
  return out

"""cpu_kernels/conv.py: the im2col-matmul kernel gradient is the same math as XLA's convolution gradient, and
a plain `nn.Conv` under `cpu_kernels.intercepted()` is flax's own."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cpu_kernels
from benchmarks import kit
from cpu_kernels import conv
from models import create_model
from tests import job_steps
from trainer import config_check

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _grads(impl, x, w, strides, padding):
  loss = lambda x, w: jnp.sum(jnp.sin(impl(x, w, strides, padding, dimension_numbers=NHWC)))
  return jax.jit(jax.grad(loss, (0, 1)))(x, w)


@pytest.mark.parametrize('x_shape,w_shape,strides,padding', [
    ((6, 28, 28, 1), (3, 3, 1, 32), (1, 1), 'SAME'),     # the CNN's first conv
    ((6, 14, 14, 32), (3, 3, 32, 64), (1, 1), 'SAME'),   # its second
    ((5, 15, 15, 8), (3, 3, 8, 16), (2, 2), 'SAME'),     # ResNet downsampling 3x3, odd size
    ((4, 16, 16, 8), (1, 1, 8, 16), (2, 2), 'SAME'),     # ResNet projection shortcut
    ((2, 23, 23, 3), (7, 7, 3, 8), (2, 2), 'SAME'),      # ImageNet stem
    ((2, 32, 32, 3), (4, 4, 3, 8), (4, 4), 'VALID'),     # ViT patch embedding
    ((2, 9, 9, 2), (3, 3, 2, 4), (1, 1), ((2, 0), (1, 3))),  # explicit, asymmetric padding
])
def test_matmul_kernel_gradient_equals_xla(x_shape, w_shape, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape) * 0.3, jnp.float32)
  want = _grads(lax.conv_general_dilated, x, w, strides, padding)
  got = _grads(conv.conv_general_dilated, x, w, strides, padding)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
  y = conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
  want_y = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5 * float(jnp.abs(want_y).max()))


def test_batch_is_chunked_so_the_im2col_block_fits(monkeypatch):
  """A batch whose im2col block exceeds CHUNK_BYTES is summed over chunks (a scan): the same gradient."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((12, 10, 10, 4)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((12, 10, 10, 6)), jnp.float32)
  whole = conv.kernel_grad(x, g, (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)))
  per_image = 10 * 10 * 36 * 4
  assert conv._chunk(12, per_image) == 12
  monkeypatch.setattr(conv, 'CHUNK_BYTES', 3 * per_image)
  assert conv._chunk(12, per_image) == 3
  assert 'scan' in str(jax.make_jaxpr(conv.kernel_grad, static_argnums=(2, 3, 4))(x, g, (3, 3, 4, 6), (1, 1),
                                                                                        ((1, 1), (1, 1))))
  chunked = conv.kernel_grad(x, g, (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)))
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-4)


def test_unsupported_cases_fall_back_to_xla():
  x = jnp.ones((2, 8, 8, 4))
  grouped = conv.conv_general_dilated(x, jnp.ones((3, 3, 2, 4)), (1, 1), 'SAME', dimension_numbers=NHWC,
                                      feature_group_count=2)
  assert grouped.shape == (2, 8, 8, 4)
  dilated = jax.grad(lambda w: conv.conv_general_dilated(x, w, (1, 1), 'SAME', rhs_dilation=(2, 2),
                                                         dimension_numbers=NHWC).sum())(jnp.ones((3, 3, 4, 4)))
  want = jax.grad(lambda w: lax.conv_general_dilated(x, w, (1, 1), 'SAME', rhs_dilation=(2, 2),
                                                     dimension_numbers=NHWC).sum())(jnp.ones((3, 3, 4, 4)))
  np.testing.assert_allclose(dilated, want, rtol=1e-6)


def _conv_grads(kernels: bool, module: nn.Module, x):
  """Initial variables, output and gradients (params, x) of a non-trivial loss of `module`."""
  def run(fn, *args):
    if not kernels:
      return fn(*args)
    with cpu_kernels.intercepted():
      return fn(*args)
  variables = run(module.init, jax.random.PRNGKey(0), x)
  loss = lambda v, x: jnp.sum(jnp.sin(run(module.apply, v, x)))
  return variables, run(module.apply, variables, x), jax.grad(loss, (0, 1))(variables, x)


@pytest.mark.parametrize('kw,x_shape', [
    (dict(features=8, kernel_size=(3, 3)), (3, 9, 9, 2)),                                    # the CNN's
    (dict(features=8, kernel_size=(3, 3), strides=2, use_bias=False), (3, 9, 9, 2)),         # ResNet's
    (dict(features=8, kernel_size=(4, 4), strides=(4, 4), padding='VALID'), (2, 8, 8, 3)),  # ViT patches
    (dict(features=4, kernel_size=(3, 3), padding=((2, 0), (1, 3)), dtype=jnp.bfloat16), (2, 9, 9, 2)),
    (dict(features=4, kernel_size=(3, 3), kernel_dilation=2), (2, 9, 9, 2)),      # flax's code
    (dict(features=4, kernel_size=(3, 3), feature_group_count=2), (2, 9, 9, 2)),  # flax's code
    (dict(features=4, kernel_size=(3,)), (2, 9, 2)),                              # 1-D: flax's code
], ids=['cnn', 'strided_no_bias', 'patches', 'explicit_bfloat16', 'dilated', 'grouped', '1d'])
def test_intercepted_conv_equals_flax(kw, x_shape, monkeypatch):
  """The same initial parameters, output and gradients as flax's nn.Conv; the matmul kernel gradient only for
  the 2-D cases it reproduces."""
  module, x = nn.Conv(**kw), jnp.asarray(np.random.default_rng(0).standard_normal(x_shape), jnp.float32)
  calls, fn = [], conv.conv_general_dilated
  monkeypatch.setattr(conv, 'conv_general_dilated', lambda *a, **k: calls.append(1) or fn(*a, **k))
  got, want = _conv_grads(True, module, x), _conv_grads(False, module, x)
  tol = 2e-2 if kw.get('dtype') == jnp.bfloat16 else 1e-5
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol * float(jnp.abs(b).max()))
  assert bool(calls) == (len(x_shape) == 4 and 'kernel_dilation' not in kw and 'feature_group_count' not in kw)


def test_cpu_kernels_select_by_platform_and_are_validated():
  assert cpu_kernels.enabled('auto', 'cpu') and not cpu_kernels.enabled('off', 'cpu')
  assert not cpu_kernels.enabled('auto', 'gpu') and not cpu_kernels.enabled('auto', 'tpu')
  c = kit.config()
  model = create_model(c, num_classes=10)  # These tests run on CPU.
  assert isinstance(model, cpu_kernels.Plugged) and isinstance(model.model, nn.Module)
  assert model.num_classes == 10  # The model's own fields read through.
  c.cpu_kernels = 'off'
  assert isinstance(create_model(c, num_classes=10), nn.Module)
  c.cpu_kernels = 'on'
  with pytest.raises(Exception, match="cpu_kernels='on' is invalid: use one of auto, off"):
    config_check.validate(c)


@functools.lru_cache(maxsize=1)
def _plain_flax_on_shard_map():
  return job_steps.run_steps({'cpu_kernels': 'off', 'parallel_backend': 'shard_map'})


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['shard_map', 'pmap', 'jit'])
def test_trainer_with_and_without_cpu_kernels_on_every_backend(backend):
  """Three steps of the default job (the CNN, global BatchNorm) on 2 devices: cpu_kernels=off (plain flax)
  gives the same losses and state on every backend as shard_map does, and the kernels stay within float
  tolerance of it."""
  want = _plain_flax_on_shard_map()
  for setting in ('off', 'auto') if backend != 'shard_map' else ('auto',):
    losses, state, eval_loss = job_steps.run_steps({'cpu_kernels': setting, 'parallel_backend': backend})
    np.testing.assert_allclose(losses, want[0], rtol=1e-5, err_msg=setting)
    np.testing.assert_allclose(eval_loss, want[2], rtol=1e-4, err_msg=setting)
    for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                    jax.tree.leaves((want[1].params, want[1].batch_stats)), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=setting)

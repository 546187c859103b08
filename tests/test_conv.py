"""models/conv.py: the im2col-matmul kernel gradient is the same math as XLA's convolution gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import default
from models import conv, create_model
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
  for a, b in zip(got, want):
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


def test_conv_impl_selects_by_platform_and_is_validated():
  assert conv.conv_for('auto', 'cpu') is conv.conv_general_dilated
  assert conv.conv_for('auto', 'gpu') is lax.conv_general_dilated
  assert conv.conv_for('auto', 'tpu') is lax.conv_general_dilated
  assert conv.conv_for('xla', 'cpu') is lax.conv_general_dilated
  assert conv.conv_for('matmul_wgrad', 'gpu') is conv.conv_general_dilated
  c = default.get_config()
  assert create_model(c, num_classes=10).conv is conv.conv_general_dilated  # These tests run on CPU.
  c.conv_impl = 'im2col'
  with pytest.raises(Exception, match='conv_impl'):
    config_check.validate(c)


def test_train_steps_match_xla_convolutions():
  """Three steps of the trainer's own job (the CNN) on 2 devices: conv_impl=matmul_wgrad vs xla, float
  tolerance. (The ResNets' stride-2, 1x1 and 7x7 convolutions are checked one by one above.)"""
  results = {impl: job_steps.run_steps({'conv_impl': impl}) for impl in ('xla', 'matmul_wgrad')}
  np.testing.assert_allclose(results['matmul_wgrad'][0], results['xla'][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results['matmul_wgrad'][1].params), jax.tree.leaves(results['xla'][1].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

"""models/norm.py: the hand-differentiated BatchNorm(-ReLU-pool) is flax's math, values and gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import default
from models import create_model, norm
from parallel import mesh as mesh_lib
from tests import job_steps
from trainer import config_check

KW = dict(momentum=0.9, epsilon=1e-5, param_dtype=jnp.float32)


class Block(nn.Module):
  """One `norm.batch_norm` in a parent scope, as the models build it; with `conv`, `norm.conv_batch_norm`
  (a 3x3 convolution whose bias the fused BatchNorm takes over)."""
  impl: str
  relu: bool
  pool: bool
  train: bool = True
  axis_name: str = None
  dtype: object = jnp.float32
  conv: bool = False

  @nn.compact
  def __call__(self, x):
    kw = dict(relu=self.relu, pool=self.pool, use_running_average=not self.train,
              axis_name=self.axis_name if self.train else None, dtype=self.dtype, **KW)
    if self.conv:
      return norm.conv_batch_norm(self.impl, 6, (3, 3), conv=lax.conv_general_dilated, **kw)(x)
    return norm.batch_norm(self.impl, **kw)(x)


def _input(shape, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape) * 2.0 + 0.5, jnp.float32)


def _variables(shape, seed=1, conv=False):
  """Both implementations' variables (the same tree: asserted), made non-trivial (a conv bias far from 0)."""
  v = Block('flax', True, False, conv=conv).init(jax.random.PRNGKey(0), jnp.zeros(shape))
  assert jax.tree.structure(v) == jax.tree.structure(Block('fused', True, False, conv=conv).init(
      jax.random.PRNGKey(0), jnp.zeros(shape)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32), v)


def _loss_and_grads(impl, relu, pool, variables, x, axis_name=None, conv=False):
  """Train-mode output, new batch_stats and gradients of a non-trivial loss w.r.t. params and x."""
  block = Block(impl, relu, pool, axis_name=axis_name, conv=conv)
  weights = jnp.cos(jnp.arange(np.prod(block.apply(variables, x, mutable=['batch_stats'])[0].shape[1:])))

  def loss(params, x):
    y, updates = block.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                             mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y.reshape(y.shape[0], -1)) * weights), (y, updates['batch_stats'])

  (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables['params'], x)
  return y, stats, grads


def _assert_trees_close(got, want, rtol=1e-5):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(jnp.abs(b).max())))


@pytest.mark.parametrize('shape,relu,pool', [
    ((6, 28, 28, 8), True, True),    # the CNN's block
    ((5, 7, 9, 4), True, True),      # odd sizes: the pool drops the last row and column
    ((4, 6, 6, 3), True, False),     # the ResNets' BatchNorm-ReLU
    ((4, 6, 6, 3), False, False),    # plain BatchNorm (before a residual add)
])
def test_fused_equals_flax_one_device(shape, relu, pool):
  x, variables = _input(shape), _variables(shape)
  want = jax.jit(functools.partial(_loss_and_grads, 'flax', relu, pool))(variables, x)
  got = jax.jit(functools.partial(_loss_and_grads, 'fused', relu, pool))(variables, x)
  _assert_trees_close(got, want)
  for train in (False,):  # eval: the running statistics
    ev = lambda impl: Block(impl, relu, pool, train=train).apply(variables, x)
    _assert_trees_close(ev('fused'), ev('flax'))


def test_conv_bias_moved_into_the_statistics_is_the_same_math():
  """`conv_batch_norm`: with `fused` the convolution's bias (far from 0 here) is only added to the statistics;
  outputs, running mean (which includes it), and gradients (its own: ~0) match nn.Conv + flax's BatchNorm."""
  x, variables = _input((6, 10, 10, 3)), _variables((6, 10, 10, 3), conv=True)
  assert float(jnp.abs(variables['params']['Conv_0']['bias']).min()) > 0.4
  want = jax.jit(functools.partial(_loss_and_grads, 'flax', True, True, conv=True))(variables, x)
  got = jax.jit(functools.partial(_loss_and_grads, 'fused', True, True, conv=True))(variables, x)
  _assert_trees_close(got, want)
  ev = lambda impl: Block(impl, True, True, train=False, conv=True).apply(variables, x)
  _assert_trees_close(ev('fused'), ev('flax'))


def test_fused_equals_flax_with_statistics_over_devices():
  """4 devices, statistics over the mesh axis (bn_mode=global) under shard_map: each device's output, input
  gradient and parameter gradients (before the step's pmean; the conv bias's per-device sums are not 0 here)
  match flax's."""
  mesh = mesh_lib.make_mesh(4)
  x, variables = _input((16, 12, 12, 3)), _variables((16, 12, 12, 3), conv=True)

  def run(impl):
    body = functools.partial(_loss_and_grads, impl, True, True, axis_name=mesh_lib.AXIS, conv=True)
    per_device = lambda v, x: jax.tree.map(lambda a: a[None], body(v, x))
    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(mesh_lib.AXIS)),
                                 out_specs=P(mesh_lib.AXIS), check_vma=False))
    return step(jax.device_put(variables, NamedSharding(mesh, P())),
                jax.device_put(x, NamedSharding(mesh, P(mesh_lib.AXIS))))

  got, want = run('fused'), run('flax')
  _assert_trees_close(got, want)
  # The statistics really are global: every device's new running mean is the same.
  means = np.asarray(got[1]['BatchNorm_0']['mean'])
  np.testing.assert_allclose(means, np.broadcast_to(means[0], (4, 6)), rtol=1e-6)
  conv_bias_grads = np.asarray(got[2][0]['Conv_0']['bias'])
  assert np.abs(conv_bias_grads).max() > 1e-3 and np.abs(conv_bias_grads.sum(0)).max() < 1e-4


def test_bfloat16_compute_stays_close_to_flax():
  x, variables = _input((4, 8, 8, 8)), _variables((4, 8, 8, 8))
  run = lambda impl: Block(impl, True, True, dtype=jnp.bfloat16).apply(variables, x.astype(jnp.bfloat16),
                                                                       mutable=['batch_stats'])
  (y, stats), (want_y, want_stats) = run('fused'), run('flax')
  assert y.dtype == want_y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(y), np.float32(want_y), rtol=2e-2, atol=2e-2)
  _assert_trees_close(stats, want_stats, rtol=1e-2)


def test_bn_impl_selects_by_platform_and_is_validated():
  assert norm.resolve('auto', 'cpu') == 'fused'
  assert norm.resolve('auto', 'gpu') == norm.resolve('auto', 'tpu') == 'flax'
  assert norm.resolve('flax', 'cpu') == 'flax'
  c = default.get_config()
  assert create_model(c, num_classes=10).bn_impl == 'auto'
  c.bn_impl = 'batchnorm'
  with pytest.raises(Exception, match='bn_impl'):
    config_check.validate(c)


@pytest.mark.parametrize('model,overrides', [
    ('cnn', {}),
    ('resnet18', {'resnet_width': 4, 'resnet_stages': '1,1', 'stem': 'small',
                  'conv_impl': 'xla'}),  # XLA's convolutions compile faster; the BatchNorm is compared
])
def test_train_steps_match_flax_batchnorm(model, overrides):
  """Three steps of the trainer's own job on 2 devices, global statistics: bn_impl=fused vs flax. The states
  have the same tree, so checkpoints move between the two."""
  results = {impl: job_steps.run_steps(dict(model=model, bn_impl=impl, **overrides)) for impl in ('flax', 'fused')}
  (losses, state, eval_loss), (want_losses, want_state, want_eval) = results['fused'], results['flax']
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  np.testing.assert_allclose(eval_loss, want_eval, rtol=1e-4)
  _assert_trees_close((state.params, state.batch_stats), (want_state.params, want_state.batch_stats), rtol=1e-4)

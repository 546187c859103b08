"""cpu_kernels/norm.py: plain `nn.BatchNorm` (after an `nn.Conv`, before `nn.relu` and `nn.avg_pool`) run under
`cpu_kernels.intercepted()` is flax's own math, values and gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import cpu_kernels
from parallel import mesh as mesh_lib
from tests import job_steps

KW = dict(momentum=0.9, epsilon=1e-5, param_dtype=jnp.float32)


class Block(nn.Module):
  """Plain flax, as the models write it: [Conv 3x3 ->] BatchNorm [-> ReLU [-> 2x2 average pool]].
  `also` adds the convolution's own output to the result, a second reader of the biased output."""
  relu: bool
  pool: bool
  train: bool = True
  axis_name: str = None
  dtype: object = jnp.float32
  conv: bool = False
  also: bool = False

  @nn.compact
  def __call__(self, x):
    if self.conv:
      x = nn.Conv(6, (3, 3), dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = nn.BatchNorm(use_running_average=not self.train, axis_name=self.axis_name if self.train else None,
                     dtype=self.dtype, **KW)(x)
    y = nn.relu(y) if self.relu else y
    y = y + 0.5 * x if self.also else y
    return nn.avg_pool(y, (2, 2), strides=(2, 2)) if self.pool else y


def _apply(kernels: bool, block, *args, **kwargs):
  """`block.apply`, with the CPU kernels plugged in or not."""
  if not kernels:
    return block.apply(*args, **kwargs)
  with cpu_kernels.intercepted():
    return block.apply(*args, **kwargs)


def _input(shape, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape) * 2.0 + 0.5, jnp.float32)


def _variables(shape, seed=1, conv=False):
  """The variables (the same tree and initial values with the kernels: asserted), made non-trivial (a conv
  bias far from 0)."""
  block = Block(True, False, conv=conv)
  v = block.init(jax.random.PRNGKey(0), jnp.zeros(shape))
  with cpu_kernels.intercepted():
    _assert_trees_close(block.init(jax.random.PRNGKey(0), jnp.zeros(shape)), v, rtol=0)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32), v)


def _loss_and_grads(kernels, relu, pool, variables, x, axis_name=None, conv=False, also=False):
  """Train-mode output, new batch_stats and gradients of a non-trivial loss w.r.t. params and x."""
  block = Block(relu, pool, axis_name=axis_name, conv=conv, also=also)
  weights = jnp.cos(jnp.arange(np.prod(_apply(False, block, variables, x, mutable=['batch_stats'])[0].shape[1:])))

  def loss(params, x):
    y, updates = _apply(kernels, block, {'params': params, 'batch_stats': variables['batch_stats']}, x,
                        mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y.reshape(y.shape[0], -1)) * weights), (y, updates['batch_stats'])

  (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables['params'], x)
  return y, stats, grads


def _assert_trees_close(got, want, rtol=1e-5):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(jnp.abs(b).max())))


def _calls(monkeypatch, module, name):
  """A list that grows by one on every call of `module.name` (which still runs)."""
  calls, fn = [], getattr(module, name)
  monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or fn(*a, **kw))
  return calls


@pytest.mark.parametrize('shape,relu,pool', [
    ((6, 28, 28, 8), True, True),    # the CNN's block
    ((5, 7, 9, 4), True, True),      # odd sizes: the pool drops the last row and column
    ((4, 6, 6, 3), True, False),     # the ResNets' BatchNorm-ReLU
    ((4, 6, 6, 3), False, False),    # plain BatchNorm (before a residual add)
])
def test_intercepted_equals_flax_one_device(shape, relu, pool, monkeypatch):
  x, variables = _input(shape), _variables(shape)
  calls = _calls(monkeypatch, cpu_kernels.norm, 'batch_norm_train')
  want = jax.jit(functools.partial(_loss_and_grads, False, relu, pool))(variables, x)
  got = jax.jit(functools.partial(_loss_and_grads, True, relu, pool))(variables, x)
  _assert_trees_close(got, want)
  assert len(calls) == 1  # In the traced train step (eval-mode BatchNorm runs flax's code).
  ev = lambda kernels: _apply(kernels, Block(relu, pool, train=False), variables, x)  # eval: running statistics
  _assert_trees_close(ev(True), ev(False))


@pytest.mark.parametrize('also', [False, True], ids=['only_reader', 'second_reader'])
def test_conv_bias_moved_into_the_statistics_is_the_same_math(also, monkeypatch):
  """A Conv straight into a BatchNorm: its bias (far from 0 here) is only added to the statistics; outputs,
  running mean (which includes it), and gradients (its own: ~0) match nn.Conv + flax's BatchNorm, also where
  something else reads the biased output too."""
  x, variables = _input((6, 10, 10, 3)), _variables((6, 10, 10, 3), conv=True)
  assert float(jnp.abs(variables['params']['Conv_0']['bias']).min()) > 0.4
  run = lambda kernels: functools.partial(_loss_and_grads, kernels, True, True, conv=True, also=also)
  want = jax.jit(run(False))(variables, x)
  shifts, bn = [], cpu_kernels.norm.batch_norm_train
  monkeypatch.setattr(cpu_kernels.norm, 'batch_norm_train', lambda x, s, *a: shifts.append(s) or bn(x, s, *a))
  _assert_trees_close(jax.jit(run(True))(variables, x), want)
  assert len(shifts) == 1 and isinstance(shifts[0], jax.core.Tracer)  # The conv's bias, not a constant 0.
  ev = lambda kernels: _apply(kernels, Block(True, True, train=False, conv=True, also=also), variables, x)
  _assert_trees_close(ev(True), ev(False))


def test_intercepted_equals_flax_with_statistics_over_devices():
  """4 devices, statistics over the mesh axis (bn_mode=global) under shard_map: each device's output, input
  gradient and parameter gradients (before the step's pmean; the conv bias's per-device sums are not 0 here)
  match flax's."""
  mesh = mesh_lib.make_mesh(4)
  x, variables = _input((16, 12, 12, 3)), _variables((16, 12, 12, 3), conv=True)

  def run(kernels):
    body = functools.partial(_loss_and_grads, kernels, True, True, axis_name=mesh_lib.AXIS, conv=True)
    per_device = lambda v, x: jax.tree.map(lambda a: a[None], body(v, x))
    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(mesh_lib.AXIS)),
                                 out_specs=P(mesh_lib.AXIS), check_vma=False))
    return step(jax.device_put(variables, NamedSharding(mesh, P())),
                jax.device_put(x, NamedSharding(mesh, P(mesh_lib.AXIS))))

  got, want = run(True), run(False)
  _assert_trees_close(got, want)
  # The statistics really are global: every device's new running mean is the same.
  means = np.asarray(got[1]['BatchNorm_0']['mean'])
  np.testing.assert_allclose(means, np.broadcast_to(means[0], (4, 6)), rtol=1e-6)
  conv_bias_grads = np.asarray(got[2][0]['Conv_0']['bias'])
  assert np.abs(conv_bias_grads).max() > 1e-3 and np.abs(conv_bias_grads.sum(0)).max() < 1e-4


def test_bfloat16_compute_stays_close_to_flax():
  x, variables = _input((4, 8, 8, 8)), _variables((4, 8, 8, 8))
  run = lambda kernels: _apply(kernels, Block(True, True, dtype=jnp.bfloat16), variables, x.astype(jnp.bfloat16),
                               mutable=['batch_stats'])
  (y, stats), (want_y, want_stats) = run(True), run(False)
  assert y.dtype == want_y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(y), np.float32(want_y), rtol=2e-2, atol=2e-2)
  _assert_trees_close(stats, want_stats, rtol=1e-2)


def test_unusual_settings_run_flax_code(monkeypatch):
  """Settings the hand-written BatchNorm does not reproduce (another axis, the two-pass variance, no scale) run
  flax's own code under the interceptor."""
  x = _input((4, 6, 6, 3))
  calls = _calls(monkeypatch, cpu_kernels.norm, 'batch_norm_train')
  for kw in (dict(axis=1), dict(use_fast_variance=False), dict(use_scale=False)):
    bn = nn.BatchNorm(use_running_average=False, **kw)
    variables = bn.init(jax.random.PRNGKey(0), x)
    fn = lambda v, x, bn=bn: _apply(True, bn, v, x, mutable=['batch_stats'])[0].sum()
    plain = lambda v, x, bn=bn: bn.apply(v, x, mutable=['batch_stats'])[0].sum()
    _assert_trees_close(jax.grad(fn)(variables, x), jax.grad(plain)(variables, x))
  assert not calls


@pytest.mark.parametrize('model,overrides', [
    ('cnn', {}),
    ('resnet18', {'resnet_width': 4, 'resnet_stages': '1,1', 'stem': 'small'}),
])
def test_train_steps_match_plain_flax(model, overrides):
  """Three steps of the trainer's own job on 2 devices, global statistics: cpu_kernels=auto vs off. The
  states have the same tree, so checkpoints move between the two."""
  results = {s: job_steps.run_steps(dict(model=model, cpu_kernels=s, **overrides)) for s in ('off', 'auto')}
  (losses, state, eval_loss), (want_losses, want_state, want_eval) = results['auto'], results['off']
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  np.testing.assert_allclose(eval_loss, want_eval, rtol=1e-4)
  _assert_trees_close((state.params, state.batch_stats), (want_state.params, want_state.batch_stats), rtol=1e-4)

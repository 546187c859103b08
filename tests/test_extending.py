"""Extending without editing the project: MODULE:ATTR models (with model_kwargs), augmentations, hooks, and a
config outside the checkout, through the examples of docs/extending.md (tests/extending_examples/)."""

import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
import plugins
from benchmarks import kit
from errors import UserError
from models import create_model
from tests import harness, job_steps
from trainer import cli, config_check, hooks

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'extending_examples')
plugins.add_config_dir(os.path.join(EXAMPLES, 'my_config.py'))  # What train.py does for --config=that file.


class NoTrain(nn.Module):
  num_classes: int

  def __call__(self, images):
    return images


class NoClasses(nn.Module):
  width: int = 1

  def __call__(self, images, train):
    return images


def not_a_module(num_classes):
  return num_classes


def hook_without_argument():
  pass


SEEN = []


def remember(info):
  SEEN.append(info)


def _config(**overrides):
  return kit.config(**overrides)


def _kwargs(**kw):
  c = _config(model='my_model:SmallNet')
  c.model_kwargs.update(kw)
  return c


@pytest.mark.parametrize('config, message', [
    (_kwargs(widht=8), r"takes no keyword 'widht': did you mean --config.model_kwargs.width\?"),
    (_kwargs(num_classes=3), r'model_kwargs.num_classes is set by the trainer'),
    (_config(model='no_such_module:Net'), r"no module named 'no_such_module' on sys.path"),
    (_config(model='my_model:SmallNett'), r"has no attribute 'SmallNett': did you mean SmallNet\?"),
    (_config(model='my_model:jnp'), r'is of type module, not a flax.linen Module class'),
    (_config(model='tests.test_extending:NoTrain'), r'NoTrain.__call__ takes no `train` argument'),
    (_config(model='tests.test_extending:NoClasses'), r'takes no num_classes keyword'),
    (_config(model='mlp', model_kwargs={'width': 8}), r'keyword arguments are for MODULE:ATTR models only'),
    (_config(model=':Net'), r"name code as 'MODULE:ATTR'"),
    (_config(augment='my_model:SmallNet'), r"augment='my_model:SmallNet' failed to build"),
    (_config(augment='my_hooks:weight_norm'), r'failed to build'),
    (_config(augment='blur'), r'use one of none, cifar, imagenet, or MODULE:ATTR'),
    (_config(hooks='my_hooks:weight_norm'), r"give 'MODULE:ATTR@EVERY' items"),
    (_config(hooks='my_hooks:weight_norm@x'), r"give 'MODULE:ATTR@EVERY' items"),
    (_config(hooks='tests.test_extending:hook_without_argument@5'), r'is not a function of one argument'),
])
def test_bad_extension_is_one_line(config, message):
  with pytest.raises(UserError, match=message) as e:
    config_check.validate(config)
  assert '\n' not in str(e.value)


def test_good_extensions_validate():
  config_check.validate(_config(model='my_model:small_net', model_kwargs={'width': 4}, augment='my_augment:Brightness',
                                hooks='my_hooks:weight_norm@4, my_hooks:weight_norm@0'))


def test_hooks_run_at_their_steps_with_steps_per_dispatch():
  """A config's hooks join the built-in actions: multiples of EVERY and the last step, even when k steps go in
  one dispatch (the plan runs single steps around them); EVERY 0 = the last step only."""
  actions = hooks.from_config(_config(hooks='tests.test_extending:remember@3,tests.test_extending:remember@0'),
                              lambda name, step: (name, step))
  SEEN.clear()
  step = 0
  for size in hooks.dispatch_sizes(actions, 0, 10, 4):
    step += size
    hooks.run_due(actions, step, 10)
  assert [s for _, s in SEEN] == [3, 6, 9, 10, 10]


def test_model_gets_kwargs_and_only_the_trainer_keywords_it_names():
  config = _kwargs(width=4)
  config.dtype = 'bfloat16'
  unplug = lambda m: m.model if isinstance(m, cpu_kernels.Plugged) else m  # The CPU kernels wrap any model.
  net = unplug(create_model(config, num_classes=3, bn_axis_name='data'))
  assert (net.num_classes, net.width, net.dtype, net.bn_axis_name) == (3, 4, jnp.bfloat16, 'data')
  plain = unplug(create_model(_config(model='my_model:small_net', model_kwargs={'width': 5}), num_classes=3,
                              bn_axis_name='data'))  # small_net names neither dtype nor an axis: gets neither.
  assert (type(plain).__name__, plain.width) == ('PlainBatchNormNet', 5)
  not_module = _config(model='tests.test_extending:not_a_module')
  with pytest.raises(UserError, match='returned type int, not a flax.linen Module'):
    create_model(not_module, num_classes=3)


def test_model_kwargs_on_the_command_line_are_typed():
  argv, pairs = cli._split_model_kwargs(['train.py', '--config.model_kwargs.width=8', '--config.lr=1',
                                         '--config.model_kwargs.act=gelu', '--config.model_kwargs.sizes=(1,2)',
                                         '--config.model_kwargs.rate=1', '--config.model_kwargs.bias=false'])
  assert argv == ['train.py', '--config.lr=1']
  c = _kwargs(rate=0.5, bias=True)
  cli._set_model_kwargs(c, pairs)
  assert c.model_kwargs.to_dict() == {'rate': 1.0, 'bias': False, 'width': 8, 'act': 'gelu', 'sizes': (1, 2)}
  assert type(c.model_kwargs.rate) is float
  with pytest.raises(UserError, match=r'the config file gives it a float \(1.0\)'):
    cli._set_model_kwargs(c, [('rate', 'fast')])
  for bad in ('--config.model_kwargs.width', '--config.model_kwargs.1x=2'):
    with pytest.raises(UserError, match=r'give --config.model_kwargs.NAME=VALUE'):
      cli._split_model_kwargs([bad])


def _close(a, b):
  np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_batch_norm_with_bn_axis_name_is_global_on_eight_devices():
  """SmallNet passes the trainer's `bn_axis_name` to nn.BatchNorm: 8 devices (shard_map, pmap) == 1."""
  one_losses, one, _ = job_steps.run_steps({'model': 'my_model:SmallNet'}, devices=1)
  for backend in ('shard_map', 'pmap'):
    losses, state, _ = job_steps.run_steps({'model': 'my_model:SmallNet', 'parallel_backend': backend}, devices=8)
    _close(losses, one_losses)
    jax.tree.map(_close, state.batch_stats, one.batch_stats)
    jax.tree.map(_close, state.params, one.params)


def test_plain_batch_norm_is_global_under_jit_and_refused_per_device():
  """A plain nn.BatchNorm (no axis_name): under jit its mean over the sharded global batch is the global
  statistic (8 devices == 1); under shard_map/pmap with bn_mode=global it is refused (it would be per device);
  with bn_mode=local it trains on per-device statistics, as documented."""
  plain = {'model': 'my_model:small_net'}
  one_losses, one, _ = job_steps.run_steps(dict(plain, parallel_backend='jit'), devices=1)
  losses, state, _ = job_steps.run_steps(dict(plain, parallel_backend='jit'), devices=8)
  _close(losses, one_losses)
  jax.tree.map(_close, state.batch_stats, one.batch_stats)
  with pytest.raises(UserError, match=r'has BatchNorm but takes no bn_axis_name .* use --config.parallel_backend=jit'):
    job_steps.run_steps(dict(plain, parallel_backend='shard_map'), devices=8)
  local_losses, _, _ = job_steps.run_steps(dict(plain, bn_mode='local'), devices=8)
  assert not np.allclose(local_losses, one_losses, rtol=1e-4)


def _project(tmp_path) -> str:
  """The examples copied outside the checkout, as a user's own project directory."""
  project = str(tmp_path / 'my_project')
  shutil.copytree(EXAMPLES, project, ignore=shutil.ignore_patterns('__pycache__'))
  return os.path.join(project, 'my_config.py')


@pytest.mark.slow
def test_outside_config_trains_evaluates_checkpoints_and_resumes(tmp_path, fake_mnist_dir):
  """docs/extending.md's walk-through: model, augmentation and hook beside a config outside the checkout."""
  config, workdir = _project(tmp_path), str(tmp_path / 'run')
  args = (f'--config.data_dir={fake_mnist_dir}', '--config.model_kwargs.width=8')
  first = harness.run_train(workdir, *args, config=config)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'augment my_augment:Brightness' in first.stderr
  second = harness.run_train(workdir, *args, '--config.num_epochs=2', config=config)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'resuming at step 8' in second.stderr
  assert harness.checkpoint_steps(workdir) == [8, 12, 16]
  events = harness.metrics(workdir)
  assert [e['step'] for e in events if e['kind'] == 'hook'] == [4, 8, 12, 16]
  assert all(e['weight_norm'] > 0 and e['hook'] == 'my_hooks:weight_norm' for e in events if e['kind'] == 'hook')
  assert [e['step'] for e in events if e['kind'] == 'eval'] == [8, 16]
  assert harness.load_checkpoint(workdir, 16)["['params']['Conv_0']['kernel']"].shape == (3, 3, 1, 8)


@pytest.mark.slow
def test_unknown_model_kwarg_on_the_command_line_names_the_nearest(tmp_path):
  r = harness.run_train(str(tmp_path / 'run'), '--config.model_kwargs.widht=8', config=_project(tmp_path))
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      "error: --config.model_kwargs.widht: my_model:SmallNet takes no keyword 'widht': did you mean "
      '--config.model_kwargs.width? its keywords are width')


@pytest.mark.parametrize('source, message', [
    ('raise RuntimeError("boom")', r'importing broken_mod failed \(RuntimeError: boom\): fix that module'),
    ('import not_installed_dep', r"importing broken_mod failed \(ModuleNotFoundError: No module named "
                                 r"'not_installed_dep'\)"),
    ('def f(:\n', r'importing broken_mod failed \(SyntaxError'),
])
def test_a_module_that_fails_to_import_is_one_line(tmp_path, monkeypatch, source, message):
  (tmp_path / 'broken_mod.py').write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, 'broken_mod', raising=False)
  with pytest.raises(UserError, match=message) as e:
    config_check.validate(_config(model='broken_mod:Net'))
  assert '\n' not in str(e.value)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_outside_config_on_two_processes_matches_one(tmp_path, fake_mnist_dir):
  """The example on 2 processes x 4 devices (jit, FSDP: a hook's `info.state` gathers across processes) gives
  the 1-process, 8-device shard_map result: params, BatchNorm statistics and the hook's records."""
  config, args = _project(tmp_path), (f'--config.data_dir={fake_mnist_dir}',)
  single = str(tmp_path / 'single')
  proc = harness.run_train(single, '--num_cpu_devices=8', *args, config=config)
  assert proc.returncode == 0, proc.stderr[-3000:]
  multi, port = str(tmp_path / 'multi'), harness.free_port()
  logs = [str(tmp_path / f'p{i}.log') for i in (0, 1)]
  procs = [harness.start_train(multi, '--num_cpu_devices=4', f'--coordinator_address=127.0.0.1:{port}',
                               '--num_processes=2', f'--process_id={i}', *args, '--config.parallel_backend=jit',
                               '--config.shard_params=fsdp', '--config.fsdp_min_bytes=0', config=config,
                               log_path=logs[i]) for i in (0, 1)]
  assert [p.wait(timeout=300) for p in procs] == [0, 0], open(logs[0]).read()[-3000:] + open(logs[1]).read()[-3000:]
  harness.assert_states_close(harness.load_checkpoint(single), harness.load_checkpoint(multi), atol=1e-5)
  norms = lambda w: [(e['step'], e['weight_norm']) for e in harness.metrics(w) if e['kind'] == 'hook']
  assert [s for s, _ in norms(multi)] == [4, 8]
  np.testing.assert_allclose(norms(multi), norms(single), rtol=1e-5)

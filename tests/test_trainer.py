"""The product end to end, through train.py: outputs, kill-and-resume, preemption, divergence."""

import json
import os
import random
import signal

import numpy as np
import pytest

from tests import harness
from tests.conftest import make_fake_mnist

pytestmark = pytest.mark.slow  # Every test here runs train.py as a subprocess.

DEVICES = '--num_cpu_devices=4'
EPOCHS = 12  # 8 steps/epoch on the fake data: 96 steps, a few seconds of training.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_fake_mnist(str(tmp_path_factory.mktemp('data')), num_train=512, num_test=100)


def _args(data_dir, *extra):
  return (DEVICES, f'--config.data_dir={data_dir}', f'--config.num_epochs={EPOCHS}', *extra)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  proc = harness.run_train(workdir, *_args(data_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _eval_lines(workdir):
  return [e for e in harness.metrics(workdir) if e['kind'] == 'eval']


def test_short_run_writes_every_output(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  proc = harness.run_train(workdir, '--num_cpu_devices=8', f'--config.data_dir={data_dir}', '--config.num_epochs=2',
                           '--config.plot=True', '--config.eval_every_steps=4', '--config.eval_batch_size=24')
  assert proc.returncode == 0, proc.stderr[-3000:]
  events = harness.metrics(workdir)
  train = [e for e in events if e['kind'] == 'train']
  evals = [e for e in events if e['kind'] == 'eval']
  assert [e['step'] for e in train] == [4, 8, 12, 16]
  assert [e['step'] for e in evals] == [4, 8, 12, 16]
  for e in train:
    assert {'step', 'epoch', 'train_loss', 'train_accuracy', 'images_per_sec', 'input_wait_share', 'eta_s'} <= set(e)
  for e in evals:
    assert e['test_examples'] == 100  # 100 = 4 full eval batches of 24 + one padded: all counted once.
    assert {'epoch', 'test_loss', 'test_accuracy'} <= set(e)
  assert evals[-1]['test_accuracy'] > 0.5, evals  # It learns (the fake classes are easy).
  assert json.load(open(os.path.join(workdir, 'config.json')))['model'] == 'mlp'
  tb = os.path.join(workdir, 'tensorboard')
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tb))
  with open(os.path.join(workdir, 'learning_curves.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert harness.checkpoint_steps(workdir) == [8, 12, 16]  # keep_checkpoints=3, every 4 steps.
  assert 'Topology' in proc.stderr and 'devices total        8' in proc.stderr


def _kill_when(proc, predicate):
  assert harness.wait_for(lambda: predicate() or proc.poll() is not None, timeout=180, interval=0.002)
  assert proc.poll() is None, 'the run ended before it could be interrupted'
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _saving(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(d) and any('tmp' in n for n in os.listdir(d))


def test_sigkill_anywhere_then_resume_is_identical(tmp_path, data_dir, uninterrupted):
  """Killed at two random steps and once in the middle of a save, then rerun: the same end state."""
  workdir = str(tmp_path / 'killed')
  rnd = random.Random(1234)
  points = sorted(rnd.sample(range(8, 88, 4), 2))
  for target in points:
    proc = harness.start_train(workdir, *_args(data_dir), log_path=str(tmp_path / f'kill{target}.log'))
    _kill_when(proc, lambda: any(e['step'] >= target for e in harness.metrics(workdir)))  # noqa: B023 (now)
  proc = harness.start_train(workdir, *_args(data_dir), log_path=str(tmp_path / 'kill_save.log'))
  before = harness.checkpoint_steps(workdir)
  _kill_when(proc, lambda: _saving(workdir) and harness.checkpoint_steps(workdir) == before)
  final = harness.run_train(workdir, *_args(data_dir))
  assert final.returncode == 0, final.stderr[-3000:]
  assert 'resuming at step' in final.stderr
  harness.assert_states_close(harness.load_checkpoint(uninterrupted), harness.load_checkpoint(workdir), atol=1e-6)
  assert _eval_lines(workdir) == _eval_lines(uninterrupted) or all(
      np.isclose(a['test_loss'], b['test_loss'], atol=1e-6) and a['step'] == b['step']
      for a, b in zip(_eval_lines(workdir), _eval_lines(uninterrupted), strict=True))
  steps = [e['step'] for e in harness.metrics(workdir)]
  kinds = [e['kind'] for e in harness.metrics(workdir)]
  assert steps == sorted(steps) and len(steps) == len(set(zip(steps, kinds, strict=True)))


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, data_dir, uninterrupted):
  workdir = str(tmp_path / 'preempted')
  log = str(tmp_path / 'term.log')
  proc = harness.start_train(workdir, *_args(data_dir, '--config.checkpoint_every_steps=1000'), log_path=log)
  assert harness.wait_for(lambda: any(e['step'] >= 20 for e in harness.metrics(workdir)) or proc.poll() is not None)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  text = open(log).read()
  assert 'Preempted' in text
  stopped = harness.checkpoint_steps(workdir)
  assert len(stopped) == 1 and 20 <= stopped[0] < EPOCHS * 8, stopped
  assert f'step {stopped[0]}' in text
  final = harness.run_train(workdir, *_args(data_dir, '--config.checkpoint_every_steps=1000'))
  assert final.returncode == 0, final.stderr[-3000:]
  assert f'resuming at step {stopped[0]}' in final.stderr
  harness.assert_states_close(harness.load_checkpoint(uninterrupted), harness.load_checkpoint(workdir), atol=1e-6)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path / 'nan')
  ok = harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=8'))
  assert ok.returncode == 0, ok.stderr[-3000:]
  good = harness.load_checkpoint(workdir, 8)
  bad = harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=40', '--config.learning_rate=1e30'))
  assert bad.returncode != 0
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith('error:') and 'NaN or Inf at step' in last, bad.stderr[-2000:]
  assert 'Traceback' not in bad.stderr
  assert harness.checkpoint_steps(workdir) == [4, 8]
  harness.assert_states_close(good, harness.load_checkpoint(workdir, 8), atol=0)
  again = harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=16'))
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resuming at step 8' in again.stderr and harness.checkpoint_steps(workdir)[-1] == 16

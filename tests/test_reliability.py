"""Faults through the real entry point: failed saves, damaged checkpoints, NaN states, two runs on one workdir,
config changes on resume, damaged workdir files, signals. Each ends with one line, never a hang or a traceback.

Faults are injected without privileges: a file where a directory should be, `RLIMIT_FSIZE` (`ulimit -f`), a
flipped bit, a read-only directory (skipped as root, who writes anyway).
"""

import glob
import json
import os
import resource
import shutil
import signal
import sys
import time

import numpy as np
import pytest

from input_pipeline import idx
from tests import harness
from tests.conftest import make_fake_mnist

pytestmark = pytest.mark.slow
DEVICES = '--num_cpu_devices=2'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_fake_mnist(str(tmp_path_factory.mktemp('data')), num_train=512, num_test=100)


def _args(data_dir, *extra):
  return (DEVICES, f'--config.data_dir={data_dir}', *extra)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """A workdir with checkpoints 4 and 8 of configs/tiny.py; tests copy it before changing anything."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  proc = harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=8'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _copy(trained, tmp_path, name='run'):
  return shutil.copytree(trained, str(tmp_path / name))


def _one_error(proc, code=2) -> str:
  """The contract of a refused or failed run: exit `code`, no traceback, exactly one `error:` line."""
  out = proc.stdout + proc.stderr
  assert 'Traceback' not in out and 'Fatal Python error' not in out, out[-3000:]
  assert proc.returncode == code, (proc.returncode, out[-3000:])
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def _ok(proc):
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0 and 'Traceback' not in out, out[-3000:]
  return out


def _all_finite(state: dict) -> bool:
  return all(np.all(np.isfinite(v)) for v in state.values() if v.dtype.kind == 'f')


# --- 1. failed saves ------------------------------------------------------------------------------------------


def test_checkpoints_path_is_a_file_fails_at_start_up(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'checkpoints'), 'w') as f:
    f.write('in the way')
  line = _one_error(harness.run_train(workdir, *_args(data_dir), timeout=120))
  assert f'{workdir}/checkpoints is a file' in line and 'choose another --workdir' in line, line
  assert not os.path.exists(os.path.join(workdir, 'metrics.jsonl')), 'it trained before checking the path'


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only directories')
def test_read_only_checkpoints_dir_fails_at_start_up(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  os.makedirs(os.path.join(workdir, 'checkpoints'))
  os.chmod(os.path.join(workdir, 'checkpoints'), 0o555)
  try:
    line = _one_error(harness.run_train(workdir, *_args(data_dir), timeout=120))
  finally:
    os.chmod(os.path.join(workdir, 'checkpoints'), 0o755)
  assert f'cannot write checkpoints to {workdir}/checkpoints' in line, line


def _file_size_limit(limit_bytes):
  def preexec():  # In the child: ignore SIGXFSZ so that an oversized write fails (EFBIG) instead of killing.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
  return preexec


def test_save_failing_mid_run_stops_at_once_without_hanging(tmp_path, data_dir):
  """`ulimit -f 100k`: the start-up probe passes, the first checkpoint's array file (~280 kB) cannot be
  written. The old code trained on, printed dozens of tracebacks and hung at exit on Orbax's threads."""
  workdir = str(tmp_path / 'run')
  t0 = time.monotonic()
  proc = harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=40'), timeout=150,
                           preexec_fn=_file_size_limit(100_000))
  line = _one_error(proc)
  assert f'saving checkpoint 4 to {workdir}/checkpoints failed' in line and 'File too large' in line, line
  assert 'free disk space' in line, line
  steps = [e['step'] for e in harness.metrics(workdir) if e['kind'] == 'train']
  assert max(steps) < 40, f'trained on to step {max(steps)} after the save failed'
  assert harness.checkpoint_steps(workdir) == [], 'a failed save left a checkpoint that claims to be complete'
  assert time.monotonic() - t0 < 150


# --- 2. checksums ---------------------------------------------------------------------------------------------


def _rewrite_one_value(workdir, step):
  """Changes one float of the saved bias by one ulp through tensorstore: the checkpoint still decodes (a
  damaged copy, bit rot under the storage's own checks), only the checksum can tell."""
  import tensorstore as ts
  spec = {'driver': 'zarr', 'kvstore': {'driver': 'ocdbt', 'path': 'params.Dense_1.bias/',
                                        'base': 'file://' + os.path.join(workdir, 'checkpoints', str(step), 'state/')}}
  array = ts.open(spec).result()
  value = array.read().result()
  value.view(np.uint32)[0] ^= 1
  array.write(value).result()


def _overwrite_payload_start(workdir, step):
  """Overwrites the start of the largest ocdbt data file (the array payload, not an index): reads fail."""
  data_files = glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'state', 'ocdbt.process_0', 'd', '*'))
  with open(max(data_files, key=os.path.getsize), 'r+b') as f:
    f.write(b'\xff' * 64)


@pytest.mark.parametrize('damage, reason', [(_rewrite_one_value, 'ChecksumMismatch'),
                                            (_overwrite_payload_start, 'Exception: Encountered error while reading')],
                         ids=['decodes-but-differs', 'unreadable'])
def test_damaged_checkpoint_is_quarantined_and_redone_from_the_previous_one(tmp_path, trained, data_dir, damage,
                                                                             reason):
  workdir = _copy(trained, tmp_path)
  intact = harness.load_checkpoint(workdir, 8)
  damage(workdir, 8)
  proc = harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=8'))
  _ok(proc)  # Orbax's other failed reads of the same checkpoint add no traceback (checkpoints.py's hook).
  ckpts = os.path.join(workdir, 'checkpoints')
  assert f'checkpoint {ckpts}/8 is unreadable ({reason}' in proc.stdout, proc.stdout[-2000:]
  assert f'Restored checkpoint {ckpts}/4' in proc.stderr, proc.stderr[-2000:]
  aside = os.listdir(os.path.join(workdir, 'checkpoints_unreadable'))
  assert len(aside) == 1 and aside[0].startswith('8-'), aside
  harness.assert_states_close(intact, harness.load_checkpoint(workdir, 8), atol=0)  # Redone from 4: identical.


def test_orbax_reads_failing_at_garbage_collection_log_one_line_others_keep_their_traceback():
  from trainer import checkpoints
  seen = []
  hook = checkpoints._orbax_unraisable_as_one_line(seen.append)

  def unraisable(filename):
    try:
      exec(compile('raise OSError("read failed")', filename, 'exec'))
    except OSError as e:
      return type('U', (), {'exc_type': OSError, 'exc_value': e, 'exc_traceback': e.__traceback__,
                            'object': None, 'err_msg': None})()

  orbax, other = unraisable('/venv/site-packages/orbax/checkpoint/x.py'), unraisable('/venv/site-packages/y.py')
  hook(orbax)
  hook(other)
  assert seen == [other]  # Orbax's: one log line; anything else: Python's own report, traceback and all.
  assert getattr(sys.unraisablehook, 'quiets_orbax', False)  # Installed by importing the module.


# --- 3. NaN never saved, 5. config changes on resume ------------------------------------------------------


def test_non_finite_state_is_never_saved_and_a_lower_lr_resumes(tmp_path, trained, data_dir):
  """lr=1e300 is inf in float32: step 9's loss is finite, its update is not. The old code saved that state."""
  workdir = _copy(trained, tmp_path)
  args = _args(data_dir, '--config.learning_rate=1e300', '--config.num_train_steps=16',
               '--config.checkpoint_every_steps=1')
  line = _one_error(harness.run_train(workdir, *args))
  assert 'NaN or Inf at step 9' in line and 'not saved' in line and 'last checkpoint (step 8' in line, line
  assert harness.checkpoint_steps(workdir) == [4, 8]
  assert _all_finite(harness.load_checkpoint(workdir, 8))
  # The documented recovery, a lower learning rate, is an allowed change: recorded in the history and the log.
  out = _ok(harness.run_train(workdir, *_args(data_dir, '--config.learning_rate=0.01', '--config.num_train_steps=12')))
  assert 'resuming at step 8' in out and harness.checkpoint_steps(workdir)[-1] == 12
  assert 'Config changed on resume at step 8' in out and 'learning_rate 1e+300 -> 0.01' in out, out[-2000:]
  with open(os.path.join(workdir, 'config_history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert [h['step'] for h in history] == [8, 8], history  # The failed run's change, then the recovery's.
  assert history[0]['changes']['learning_rate'] == {'from': 0.05, 'to': 1e300}
  assert history[1]['changes']['learning_rate'] == {'from': 1e300, 'to': 0.01}
  assert history[1]['changes']['num_train_steps'] == {'from': 16, 'to': 12}
  assert json.load(open(os.path.join(workdir, 'config.json')))['learning_rate'] == 0.01


def test_non_finite_state_before_any_checkpoint_does_not_claim_one(tmp_path, data_dir):
  line = _one_error(harness.run_train(str(tmp_path / 'run'), *_args(data_dir, '--config.learning_rate=1e300')))
  assert 'NaN or Inf at step' in line and 'no checkpoint was written yet' in line and 'intact' not in line, line


def test_loss_growing_without_bound_stops_the_run(tmp_path, data_dir):
  """lr=100: the loss climbs to ~1e15 and stays finite; the old code ended with exit 0."""
  line = _one_error(harness.run_train(str(tmp_path / 'run'), *_args(data_dir, '--config.learning_rate=100')))
  assert 'the run diverged' in line and '--config.learning_rate' in line, line


def test_resume_refuses_a_change_of_the_data_stream_or_model(tmp_path, trained, data_dir):
  workdir = _copy(trained, tmp_path)
  before = {f: open(os.path.join(workdir, f)).read() for f in ('config.json', 'metrics.jsonl')}
  line = _one_error(harness.run_train(workdir, *_args(data_dir, '--config.seed=1', '--config.batch_size=32',
                                                      '--config.num_train_steps=8')))
  assert '--config.seed 0 -> 1' in line and '--config.batch_size 64 -> 32' in line and 'new --workdir' in line, line
  assert {f: open(os.path.join(workdir, f)).read() for f in before} == before
  assert harness.checkpoint_steps(workdir) == [4, 8]
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_unreadable'))


# --- 4. one run per workdir; 5/6. what a killed run leaves must not block the resume ------------------------


def test_second_run_on_a_busy_workdir_is_refused_and_a_killed_run_resumes(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  first = harness.start_train(workdir, *_args(data_dir, '--config.num_train_steps=100000'),
                              log_path=str(tmp_path / 'first.log'))
  try:
    assert harness.wait_for(lambda: harness.checkpoint_steps(workdir) or first.poll() is not None, timeout=180)
    assert first.poll() is None, open(tmp_path / 'first.log').read()[-3000:]
    before = open(os.path.join(workdir, 'config.json')).read()
    line = _one_error(harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=8'), timeout=120))
    assert f'--workdir={workdir} is in use by another run (pid {first.pid} ' in line, line
    assert first.poll() is None and open(os.path.join(workdir, 'config.json')).read() == before
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  last = harness.checkpoint_steps(workdir)[-1]
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"kind": "train", "step": 99, "train_lo')  # Killed mid-write.
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write('{"seed": 0, "bat')
  out = _ok(harness.run_train(workdir, *_args(data_dir, f'--config.num_train_steps={last + 4}')))
  assert f'resuming at step {last}' in out  # The OS released the dead run's lock.
  assert 'is not JSON (torn by a killed run?)' in out
  assert 'config.json is unreadable' in out  # A warning: the checkpoints' own fingerprint guards the resume.
  steps = [(e['kind'], e['step']) for e in harness.metrics(workdir)]
  assert len(steps) == len(set(steps)) and steps[-1] == ('eval', last + 4), steps


def test_metrics_file_that_is_a_directory(tmp_path, trained, data_dir):
  workdir = _copy(trained, tmp_path)
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  os.makedirs(os.path.join(workdir, 'metrics.jsonl'))
  line = _one_error(harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=12')))
  assert f'{workdir}/metrics.jsonl is not a file' in line, line
  assert harness.checkpoint_steps(workdir) == [4, 8]


def test_empty_test_split_is_refused_before_training(tmp_path):
  data = make_fake_mnist(str(tmp_path / 'data'), num_train=256, num_test=1)
  for stem in idx.SPLIT_FILES['test']:
    os.remove(os.path.join(data, stem + '.gz'))
  idx.write_idx(os.path.join(data, idx.SPLIT_FILES['test'][0] + '.gz'), np.zeros((0, 28, 28), np.uint8))
  idx.write_idx(os.path.join(data, idx.SPLIT_FILES['test'][1] + '.gz'), np.zeros(0, np.uint8))
  workdir = str(tmp_path / 'run')
  line = _one_error(harness.run_train(workdir, *_args(data), timeout=120))
  assert 'test split' in line and 'is empty' in line and '--config.data_dir' in line, line
  assert not os.path.exists(workdir)


# --- 9. signals -----------------------------------------------------------------------------------------------


def test_sigterm_during_start_up_exits_zero_with_one_line(tmp_path, data_dir):
  """Old code: exit -15 (143 in a shell), no message."""
  for name, wait in (('imports', lambda wd: time.sleep(1.5) or True),  # Python runs, JAX is being imported.
                     ('setup', lambda wd: os.path.exists(os.path.join(wd, '.lock')))):
    workdir = str(tmp_path / name)
    log = str(tmp_path / f'{name}.log')
    proc = harness.start_train(workdir, *_args(data_dir), log_path=log)
    assert harness.wait_for(lambda: wait(workdir) or proc.poll() is not None, timeout=120)  # noqa: B023 (now)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, open(log).read()[-3000:]
    text = open(log).read()
    assert 'Traceback' not in text, text[-3000:]
    assert 'Stopped (SIGTERM) during start-up' in text or 'Preempted: checkpoint saved at step 1/' in text, text[-2000:]


def test_ctrl_c_saves_and_exits_zero_and_a_second_one_exits_at_once(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  args = _args(data_dir, '--config.num_train_steps=100000', '--config.checkpoint_every_steps=1000')
  log = str(tmp_path / 'int.log')
  proc = harness.start_train(workdir, *args, log_path=log)
  assert harness.wait_for(lambda: any(e['step'] >= 8 for e in harness.metrics(workdir)) or proc.poll() is not None)
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=60) == 0, open(log).read()[-3000:]
  text = open(log).read()
  steps = harness.checkpoint_steps(workdir)
  assert 'Traceback' not in text and len(steps) == 1 and f'Preempted: checkpoint saved at step {steps[0]}/' in text
  log2 = str(tmp_path / 'int2.log')
  proc = harness.start_train(workdir, *args, log_path=log2)
  assert harness.wait_for(lambda: any(e['step'] >= steps[0] + 8 for e in harness.metrics(workdir))
                          or proc.poll() is not None)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=10) == 130, open(log2).read()[-3000:]
  text = open(log2).read()
  assert 'Second Ctrl-C: exiting at once' in text and 'Traceback' not in text, text[-2000:]


# SIGHUP: the terminal closed or the SSH session dropped. SIGUSR1: Slurm's `--signal=USR1@SECONDS` warning.
# Both act as SIGTERM does; the default action of either would end the run at once, with no line and no save.
OTHER_SIGNALS = pytest.mark.parametrize('sig', [signal.SIGHUP, signal.SIGUSR1], ids=['SIGHUP', 'SIGUSR1'])


@OTHER_SIGNALS
def test_hangup_and_slurm_warning_during_start_up_exit_zero_with_one_line(tmp_path, data_dir, sig):
  for name, wait in (('imports', lambda wd: time.sleep(1.5) or True),
                     ('setup', lambda wd: os.path.exists(os.path.join(wd, '.lock')))):
    workdir = str(tmp_path / name)
    log = str(tmp_path / f'{name}.log')
    proc = harness.start_train(workdir, *_args(data_dir), log_path=log)
    assert harness.wait_for(lambda: wait(workdir) or proc.poll() is not None, timeout=120)  # noqa: B023 (now)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0, open(log).read()[-3000:]
    text = open(log).read()
    assert 'Traceback' not in text, text[-3000:]
    assert f'Stopped ({sig.name}) during start-up' in text or 'Preempted: checkpoint saved at step 1/' in text, \
        text[-2000:]


@OTHER_SIGNALS
def test_hangup_and_slurm_warning_save_at_the_next_step_exit_zero_and_resume(tmp_path, data_dir, sig):
  """Sent just after an eval (a checkpoint save may be running): the run saves at the next step boundary."""
  workdir = str(tmp_path / 'run')
  log = str(tmp_path / 'run.log')
  proc = harness.start_train(workdir, *_args(data_dir, '--config.num_train_steps=100000', '--config.eval_every_steps=8',
                                             '--config.checkpoint_every_steps=8'), log_path=log)
  assert harness.wait_for(lambda: any(e['kind'] == 'eval' and e['step'] >= 8 for e in harness.metrics(workdir))
                          or proc.poll() is not None)
  proc.send_signal(sig)
  assert proc.wait(timeout=60) == 0, open(log).read()[-3000:]
  text = open(log).read()
  steps = harness.checkpoint_steps(workdir)
  assert 'Traceback' not in text and steps and steps[-1] >= 8, (steps, text[-3000:])
  assert f'Preempted ({sig.name}): saved a checkpoint at step {steps[-1]} of 100000' in text, text[-2000:]
  assert f'Preempted: checkpoint saved at step {steps[-1]}/100000' in text
  out = _ok(harness.run_train(workdir, *_args(data_dir, f'--config.num_train_steps={steps[-1] + 4}')))
  assert f'resuming at step {steps[-1]}' in out and harness.checkpoint_steps(workdir)[-1] == steps[-1] + 4


def test_hangup_during_the_final_eval_and_save_completes_the_run(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  log = str(tmp_path / 'run.log')
  proc = harness.start_train(workdir, *_args(data_dir, '--config.num_train_steps=8'), log_path=log)
  assert harness.wait_for(lambda: any(e['kind'] == 'eval' for e in harness.metrics(workdir)) or proc.poll() is not None)
  proc.send_signal(signal.SIGHUP)
  assert proc.wait(timeout=60) == 0, open(log).read()[-3000:]
  text = open(log).read()
  assert 'Traceback' not in text and harness.checkpoint_steps(workdir)[-1] == 8, text[-3000:]


def test_closed_terminal_saves_and_exits_zero(tmp_path, data_dir):
  """The real thing behind a SIGHUP: train.py's controlling terminal goes away (its pty master is closed), so
  the kernel sends SIGHUP and every later write to the terminal fails (EIO). It still saves and exits 0."""
  import fcntl
  import pty
  import select
  import subprocess
  import termios
  master, slave = pty.openpty()

  def own_terminal():  # In the child: a new session whose controlling terminal is the pty, as in an SSH login.
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)

  workdir = str(tmp_path / 'run')
  cmd = harness.train_cmd(workdir, *_args(data_dir, '--config.num_train_steps=100000',
                                          '--config.checkpoint_every_steps=1000'))
  proc = subprocess.Popen(cmd, cwd=harness.ROOT, env=harness._env(), stdin=slave, stdout=slave, stderr=slave,
                          preexec_fn=own_terminal)
  os.close(slave)
  seen = []

  def read_terminal():  # What a terminal does: read the run's output (else its writes block on a full pty).
    while select.select([master], [], [], 0)[0]:
      try:
        seen.append(os.read(master, 65536))
      except OSError:
        return

  try:
    assert harness.wait_for(lambda: read_terminal() or any(e['step'] >= 8 for e in harness.metrics(workdir))
                            or proc.poll() is not None)
    assert proc.poll() is None, b''.join(seen)[-3000:]
  finally:
    os.close(master)  # The terminal window closes.
  assert proc.wait(timeout=60) == 0, b''.join(seen)[-3000:]
  steps = harness.checkpoint_steps(workdir)
  assert len(steps) == 1 and steps[0] >= 8, steps


# --- paths, profile and schedule lines -------------------------------------------------------------------------


def test_tilde_in_workdir_and_data_dir_expands_and_the_log_says_where(tmp_path, data_dir, monkeypatch):
  """`--workdir='~/runs/x'` (quoted: the shell leaves the `~`) trains into ~/runs/x, not a literal ./~/runs/x."""
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  shutil.copytree(data_dir, str(tmp_path / 'home' / 'data'))
  out = _ok(harness.run_train('~/runs/x', DEVICES, '--config.data_dir=~/data', '--config.num_train_steps=4'))
  assert harness.checkpoint_steps(str(tmp_path / 'home' / 'runs' / 'x')) == [4]
  assert not os.path.exists(os.path.join(harness.ROOT, '~')), 'trained into a literal ./~ folder'
  assert f'Workdir: {tmp_path}/home/runs/x' in out and f'idx:{tmp_path}/home/data' in out, out[-3000:]


def test_profile_steps_beyond_the_run_are_clamped(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  out = _ok(harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=8', '--config.profile_steps=100000')))
  assert 'profile_steps=100000 runs past the end of the run (step 8): tracing the 7 steps 2..8 instead' in out, \
      out[-3000:]
  assert 'Profile of steps 2..8 written' in out and '100001' not in out, out[-3000:]


def test_resume_with_a_longer_schedule_logs_the_learning_rate_jump(tmp_path, trained, data_dir):
  """Cosine over 8 steps ends at 0; resumed at 8 of 16 it is back at half the peak (0.05 / 2)."""
  workdir = _copy(trained, tmp_path)
  out = _ok(harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=16')))
  assert ('Schedule changed on resume: 8 -> 16 total steps (cosine); the learning rate at step 8 goes from 0 '
          '(saved schedule) to 0.025') in out, out[-3000:]
  again = _ok(harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=16')))
  assert 'Schedule changed' not in again  # The same schedule: no line.

"""The multi-host code path for real: two OS processes x 4 simulated devices, jax.distributed on 127.0.0.1."""

import os
import shutil
import signal
import socket
import tempfile
import time

import pytest

from tests import harness
from tests.conftest import make_fake_mnist

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_fake_mnist(str(tmp_path_factory.mktemp('data')), num_train=512, num_test=100)


def _start_pair(workdir, *args, logs, devices=4, each=((), ())):
  """Processes 0 and 1 of one job; `each[i]`: flags for process i only."""
  port = harness.free_port()
  return [harness.start_train(workdir, f'--num_cpu_devices={devices}', f'--coordinator_address=127.0.0.1:{port}',
                              '--num_processes=2', f'--process_id={i}', *args, *each[i], log_path=logs[i])
          for i in (0, 1)]


def test_two_processes_match_one_process(tmp_path, data_dir):
  args = (f'--config.data_dir={data_dir}', '--config.num_epochs=2')
  single = str(tmp_path / 'single')
  proc = harness.run_train(single, '--num_cpu_devices=8', *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # shard_map also takes 3 steps per dispatch here (`place_steps` across processes); pmap one at a time; jit
  # with FSDP (floor 0: the state split over both processes' devices, gathered for checkpoints and checksums).
  fsdp = ('--config.shard_params=fsdp', '--config.fsdp_min_bytes=0')
  for backend, per_dispatch, extra in (('shard_map', 3, ()), ('pmap', 1, ()), ('jit', 3, fsdp)):
    multi = str(tmp_path / f'multi_{backend}')
    logs = [str(tmp_path / f'{backend}{i}.log') for i in (0, 1)]
    procs = _start_pair(multi, *args, f'--config.parallel_backend={backend}',
                        f'--config.steps_per_dispatch={per_dispatch}', *extra, logs=logs)
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], open(logs[0]).read()[-3000:] + open(logs[1]).read()[-3000:]
    assert 'processes            2' in open(logs[0]).read()
    harness.assert_states_close(harness.load_checkpoint(single), harness.load_checkpoint(multi), atol=1e-5)
    evals = lambda w: [(e['step'], e['test_examples']) for e in harness.metrics(w) if e['kind'] == 'eval']
    assert evals(multi) == evals(single) == [(8, 100), (16, 100)]
  assert not os.path.exists(os.path.join(str(tmp_path / 'single'), 'metrics.jsonl.tmp'))


def test_killed_peer_fails_the_survivor_then_both_resume(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  args = (f'--config.data_dir={data_dir}', '--config.num_epochs=500', '--heartbeat_timeout=10')  # Fail fast.
  logs = [str(tmp_path / f'p{i}.log') for i in (0, 1)]
  procs = _start_pair(workdir, *args, logs=logs)
  assert harness.wait_for(lambda: harness.checkpoint_steps(workdir) and harness.checkpoint_steps(workdir)[-1] >= 8
                          or any(p.poll() is not None for p in procs), timeout=240)
  assert all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:]
  procs[1].send_signal(signal.SIGKILL)
  t0 = time.time()
  code = procs[0].wait(timeout=150)
  elapsed = time.time() - t0
  assert code != 0 and elapsed < 120, (code, elapsed)
  survivor = open(logs[0]).read()
  # A collective that fails (the peer's socket closed) is one "lost contact" line and exit 2, never disk advice
  # (old code: "saving checkpoint N failed (Gloo AllGather ...): free disk space"). When JAX's heartbeat check
  # notices first, JAX aborts the survivor from C++ with "another task died"; when the kill lands mid-message,
  # gloo's TCP transport may abort it (a thread dump: known limitations, docs/multihost.md). Either way it stops
  # at once, and resumes.
  lost = 'error: lost contact with another process during ' in survivor
  assert lost or 'another task died' in survivor or 'heartbeat' in survivor \
      or 'gloo' in survivor and 'Fatal Python error: Aborted' in survivor, survivor[-3000:]
  assert 'free disk space' not in survivor, survivor[-3000:]
  if lost:
    assert code == 2 and 'Fatal Python error' not in survivor and 'Traceback' not in survivor, survivor[-3000:]
  last = harness.checkpoint_steps(workdir)[-1]
  logs2 = [str(tmp_path / f'r{i}.log') for i in (0, 1)]
  procs = _start_pair(workdir, f'--config.data_dir={data_dir}', f'--config.num_train_steps={last + 8}', logs=logs2)
  assert [p.wait(timeout=300) for p in procs] == [0, 0], open(logs2[0]).read()[-3000:]
  assert f'resuming at step {last}' in open(logs2[0]).read()
  assert harness.checkpoint_steps(workdir)[-1] == last + 8


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGUSR1], ids=['SIGTERM', 'SIGUSR1'])
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, data_dir, sig):
  """JAX's preemption sync: the processes agree on one step, save together, and exit 0. JAX takes SIGTERM
  over; SIGUSR1 (and SIGHUP, SIGINT) reach it forwarded as a SIGTERM by the trainer's handler."""
  workdir = str(tmp_path / 'run')
  logs = [str(tmp_path / f'p{i}.log') for i in (0, 1)]
  procs = _start_pair(workdir, f'--config.data_dir={data_dir}', '--config.num_epochs=500',
                      '--config.checkpoint_every_steps=100000', logs=logs)
  assert harness.wait_for(lambda: any(e['step'] >= 16 for e in harness.metrics(workdir))
                          or any(p.poll() is not None for p in procs), timeout=240)
  assert all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:]
  procs[1].send_signal(sig)
  assert [p.wait(timeout=120) for p in procs] == [0, 0], open(logs[0]).read()[-3000:]
  steps = harness.checkpoint_steps(workdir)
  assert len(steps) == 1 and steps[0] >= 16, steps
  for log in logs:
    assert f'Preempted: checkpoint saved at step {steps[0]}/' in open(log).read()


def _refused(proc, log, *expected, limit):
  """Exit 2 with one `error:` line (no abort, no traceback) within `limit` seconds."""
  code = proc.wait(timeout=limit)
  text = open(log).read()
  assert code == 2, (code, text[-3000:])
  assert 'Traceback' not in text and 'Fatal Python error' not in text and 'Check failure' not in text, text[-3000:]
  lines = [line for line in text.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, text[-3000:]
  for e in expected:
    assert e in lines[0], (e, lines[0])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_start_up_mistakes_give_one_line(tmp_path, data_dir):
  """Old code: process 0 alone aborted ("another task died"), a taken port crashed (SIGSEGV), a mismatched
  --num_processes trained on a wrong topology, a duplicate --process_id aborted every process."""
  timeout = 6
  started, t0 = {}, time.monotonic()

  def start(name, *flags, port, wait=timeout):
    log = str(tmp_path / f'{name}.log')
    started[name] = (harness.start_train(str(tmp_path / name.split('_')[0]), '--num_cpu_devices=2',
                                         f'--config.data_dir={data_dir}', f'--coordinator_address=127.0.0.1:{port}',
                                         f'--distributed_timeout={wait}', *flags, log_path=log), log)

  alone, mismatch, same, taken = (harness.free_port() for _ in range(4))
  start('alone', '--num_processes=2', '--process_id=0', port=alone)
  start('mismatch_0', '--num_processes=2', '--process_id=0', port=mismatch)
  start('mismatch_1', '--num_processes=3', '--process_id=1', port=mismatch)
  start('same_a', '--num_processes=2', '--process_id=1', port=same, wait=120)  # Holds its id while same_b starts.
  lock = os.path.join(tempfile.gettempdir(), f'dptrain-127.0.0.1_{same}-process1.lock')
  harness.wait_for(lambda: os.path.exists(lock), timeout=30)  # same_a holds its id (old code: just a head start).
  start('same_b', '--num_processes=2', '--process_id=1', port=same)
  with socket.socket() as blocker:
    blocker.bind(('127.0.0.1', taken))
    blocker.listen()
    start('taken', '--num_processes=2', '--process_id=0', port=taken)
    _refused(*started['taken'], 'cannot listen at 127.0.0.1:', 'Address already in use', 'free port', limit=90)
  _refused(*started['same_b'], '--process_id=1', 'own --process_id', limit=90)
  started['same_a'][0].send_signal(signal.SIGKILL)
  started['same_a'][0].wait()
  _refused(*started['alone'], 'could not join the 2-process job', f'within {timeout}s', '--num_processes=2', limit=90)
  for i, other in ((0, 3), (1, 2)):
    _refused(*started[f'mismatch_{i}'], 'the processes disagree', f'on process {1 - i}', f'--num_processes={other}',
             limit=90)
  assert time.monotonic() - t0 < 120


def test_refused_resume_stops_both_processes_and_changes_nothing(tmp_path, data_dir):
  """Process 0 judges the start against the checkpoint's record (no config.json here); both stop, nothing written."""
  workdir = str(tmp_path / 'run')
  logs = [str(tmp_path / f'p{i}.log') for i in (0, 1)]
  copy = shutil.copytree(data_dir, str(tmp_path / 'host1_copy'))  # Hosts' copies may sit in other directories.
  each = ((f'--config.data_dir={data_dir}',), (f'--config.data_dir={copy}', '--config.data_threads=1'))
  procs = _start_pair(workdir, '--config.num_train_steps=4', logs=logs, each=each)
  assert [p.wait(timeout=300) for p in procs] == [0, 0], open(logs[0]).read()[-3000:]
  os.remove(os.path.join(workdir, 'config.json'))
  before = harness.workdir_files(workdir)
  logs = [str(tmp_path / f'r{i}.log') for i in (0, 1)]
  procs = _start_pair(workdir, f'--config.data_dir={data_dir}', '--config.seed=1', logs=logs)
  _refused(procs[0], logs[0], '--config.seed 0 -> 1', limit=120)
  _refused(procs[1], logs[1], 'process 0 refused to start', limit=120)
  assert harness.workdir_files(workdir) == before


def test_processes_that_disagree_stop_together_with_one_line(tmp_path, data_dir):
  """Old code: another learning rate trained diverging "replicas" to exit 0, folders differing by one file
  trained on different file lists, another num_train_steps ended in a traceback and, 60 s later, disk advice;
  a process that stopped at start-up left its peer to time out in a collective."""
  from tests.image_folders import make_image_folder
  folders = [make_image_folder(str(tmp_path / f'images{i}'), per_class=(8, 4)) for i in (0, 1)]
  os.remove(os.path.join(folders[1], 'train', 'class_01', '00003.png'))
  images = ('--config.data_source=folder', '--config.dataset=shapes', '--config.batch_size=8',
            '--config.eval_batch_size=4')
  cases = {  # name: (flags of both, (flags of process 0, flags of process 1))
      'lr': ((f'--config.data_dir={data_dir}',), (('--config.learning_rate=0.05',), ('--config.learning_rate=0.2',))),
      'steps': ((f'--config.data_dir={data_dir}',), (('--config.num_train_steps=4',), ('--config.num_train_steps=8',))),
      'files': (images, tuple((f'--config.data_dir={f}',) for f in folders)),
      'stopped': ((), ((f'--config.data_dir={data_dir}',), (f'--config.data_dir={tmp_path / "missing"}',))),
  }
  t0, pairs = time.monotonic(), {}
  for name, (both, each) in cases.items():
    logs = [str(tmp_path / f'{name}{i}.log') for i in (0, 1)]
    pairs[name] = (_start_pair(str(tmp_path / name), *both, '--distributed_timeout=60', logs=logs, devices=2,
                               each=each), logs)
  expected = {
      'lr': ['the processes disagree: process 1 has --config.learning_rate=0.2, process 0 has 0.05: start every '
             'process with the same config'] * 2,
      'steps': ['process 1 has --config.num_train_steps=8, process 0 has 4'] * 2,
      'files': ['the data on process 1 differs from process 0 (23 vs 24 train examples; folder:'
                f'{folders[1]}'] * 2,
      'stopped': ['process 1 stopped before training (error: --config.data_dir=', 'does not exist'],
  }
  for name, (procs, logs) in pairs.items():
    for i in (0, 1):
      _refused(procs[i], logs[i], expected[name][i], limit=120)
    assert not os.path.exists(os.path.join(str(tmp_path / name), 'config.json'))
  assert time.monotonic() - t0 < 60  # Within seconds of start-up, not after --distributed_timeout.


def test_synthetic_data_on_two_processes_matches_one(tmp_path):
  """Each process generates only its rows of every batch, on its devices: the same run as one process."""
  args = ('--config.data_source=synthetic', '--config.synthetic_train_examples=256',
          '--config.synthetic_eval_examples=40', '--config.num_epochs=1')
  single = str(tmp_path / 'single')
  proc = harness.run_train(single, '--num_cpu_devices=8', *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  multi = str(tmp_path / 'multi')
  logs = [str(tmp_path / f'p{i}.log') for i in (0, 1)]
  procs = _start_pair(multi, *args, '--config.steps_per_dispatch=2', logs=logs)
  codes = [p.wait(timeout=300) for p in procs]
  assert codes == [0, 0], open(logs[0]).read()[-3000:] + open(logs[1]).read()[-3000:]
  harness.assert_states_close(harness.load_checkpoint(single), harness.load_checkpoint(multi), atol=1e-5)
  evals = lambda w: [(e['step'], e['test_examples'], round(e['test_loss'], 5)) for e in harness.metrics(w)
                     if e['kind'] == 'eval']
  assert evals(multi) == evals(single) and evals(single)[0][:2] == (4, 40)

"""One run per bucket workdir: train.py against a real fake-gcs-server, with a short lease. A second job on a
live run is refused; a job frozen past its lease loses the lock to a rerun and stops at its next renewal; a
killed job's rerun takes over at once on the same host, and after at most the lease when it cannot tell; a
clean exit releases the lock."""

import datetime
import json
import os
import re
import signal
import socket
import time

import pytest

import storage
from storage import lease
from tests import harness
from tests.conftest import make_fake_mnist

pytestmark = pytest.mark.slow
LEASE = 4


@pytest.fixture(scope='module')
def env(gcs_server):
  with pytest.MonkeyPatch.context() as mp:
    for k, v in gcs_server.env.items():
      mp.setenv(k, v)
    mp.setenv('DPTRAIN_CACHE_DIR', str(harness.ROOT) + '/.pytest_cache/dptrain_cache')
    yield gcs_server


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_fake_mnist(str(tmp_path_factory.mktemp('data')), num_train=256, num_test=48)


def _args(data_dir, *extra):
  return ('--num_cpu_devices=2', f'--config.data_dir={data_dir}', f'--config.workdir_lease_s={LEASE}', *extra)


def _log(path):
  return open(path).read()


def _errors(text):
  return [line for line in text.splitlines() if line.startswith('error:')]


def _lock(workdir):
  got = lease.read(storage.join(workdir, '.lock'))
  return None if got is None else json.loads(got[0])


def _at(text, marker) -> datetime.datetime:
  """The absl timestamp (HH:MM:SS.micros) of the first log line containing `marker`."""
  line = next(line for line in text.splitlines() if marker in line)
  return datetime.datetime.strptime(re.match(r'[IWE]\d{4} (\S+)', line).group(1), '%H:%M:%S.%f')


def test_a_live_run_refuses_a_second_job_and_stops_once_taken_over(env, data_dir, tmp_path):
  workdir = f'gs://{env.new_bucket()}/run'
  logs = {n: str(tmp_path / f'{n}.log') for n in ('a', 'b', 'c')}
  a = harness.start_train(workdir, *_args(data_dir, '--config.num_epochs=500'), log_path=logs['a'])
  try:
    assert harness.wait_for(lambda: harness.metrics(workdir) or a.poll() is not None, timeout=180, interval=0.2)
    assert a.poll() is None, _log(logs['a'])[-3000:]
    holder = _lock(workdir)
    assert holder['pid'] == a.pid and holder['host'] == socket.gethostname(), holder

    t0 = time.monotonic()
    b = harness.run_train(workdir, *_args(data_dir), timeout=180)
    out = b.stdout + b.stderr
    assert b.returncode == 2 and 'Traceback' not in out and len(_errors(out)) == 1, out[-3000:]
    line = _errors(out)[0]
    assert 'is in use by another run' in line and f'pid {a.pid} on {socket.gethostname()} since' in line, line
    assert f'waiting up to {LEASE}s' in out, out[-3000:]
    assert time.monotonic() - t0 < 120
    assert a.poll() is None and _lock(workdir)['token'] == holder['token']  # The live run kept its lock.

    # A frozen holder (a paused VM, a stopped process) renews nothing: a rerun takes over after the lease, and
    # the holder, thawed, finds its lock taken at its next renewal and stops.
    a.send_signal(signal.SIGSTOP)
    c = harness.start_train(workdir, *_args(data_dir, '--config.num_train_steps=8'), log_path=logs['c'])
    assert harness.wait_for(lambda: 'Took over the lock' in _log(logs['c']) or c.poll() is not None, timeout=180)
    text = _log(logs['c'])
    assert 'its lease was not renewed for 4s' in text and f'pid {a.pid}' in text, text[-3000:]
    wait = (_at(text, 'Took over the lock') - _at(text, f'waiting up to {LEASE}s')).total_seconds()
    assert LEASE - 0.5 <= wait <= LEASE + 6, wait
    a.send_signal(signal.SIGCONT)
    assert a.wait(timeout=60) == 2
    text = _log(logs['a'])
    assert 'Traceback' not in text and len(_errors(text)) == 1, text[-3000:]
    assert f'another run took over the lock of --workdir={workdir} (pid {c.pid} on' in _errors(text)[0], text[-3000:]
    assert c.wait(timeout=240) == 0, _log(logs['c'])[-3000:]
  finally:
    for p in (a,):
      if p.poll() is None:
        p.send_signal(signal.SIGCONT)
        p.kill()
  assert _lock(workdir) is None  # Released on the clean exit.


def test_a_killed_runs_rerun_takes_over_at_once_here_and_after_the_lease_elsewhere(env, data_dir, tmp_path):
  workdir = f'gs://{env.new_bucket()}/run'
  log = str(tmp_path / 'a.log')
  a = harness.start_train(workdir, *_args(data_dir, '--config.num_epochs=500'), log_path=log)
  assert harness.wait_for(lambda: harness.metrics(workdir) or a.poll() is not None, timeout=180, interval=0.2)
  a.kill()
  a.wait()
  killed = _lock(workdir)
  assert killed['pid'] == a.pid
  out = harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=4'))
  text = out.stdout + out.stderr
  assert out.returncode == 0, text[-3000:]
  assert 'its process is gone' in text and 'waiting up to' not in text, text[-3000:]
  assert _lock(workdir) is None

  # The lease a job killed on another host leaves behind: nobody renews it; this host cannot see its process.
  url = storage.join(workdir, '.lock')
  lease.create(url, json.dumps(dict(killed, host='another-host', token='x')).encode())
  out = harness.run_train(workdir, *_args(data_dir, '--config.num_train_steps=8'))
  text = out.stdout + out.stderr
  assert out.returncode == 0, text[-3000:]
  assert f'is locked by pid {a.pid} on another-host' in text and 'its lease was not renewed' in text, text[-3000:]
  wait = (_at(text, 'Took over the lock') - _at(text, f'waiting up to {LEASE}s')).total_seconds()
  assert LEASE - 0.5 <= wait <= LEASE + 6, wait
  assert _lock(workdir) is None
  assert not os.path.exists(os.path.join(harness.ROOT, 'gs:'))

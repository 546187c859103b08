"""A bucket workdir when the storage network fails, through train.py against a real fake-gcs-server behind a
fault-injecting proxy (tests/storage_proxy.py): an endpoint that does not answer at start, transient errors
(429, 503, dropped connections) during a run, and the server going away mid-run (then coming back)."""

import subprocess
import time

import numpy as np
import pytest

import storage
from tests import harness, storage_servers
from tests.conftest import make_fake_mnist
from tests.storage_proxy import FaultProxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def proxied():
  """A fake-gcs-server of its own, whose upload URLs point at the proxy in front of it."""
  port = harness.free_port()
  server = storage_servers.start_gcs(external_url=f'http://127.0.0.1:{port}')
  proxy = FaultProxy(server.url, port)
  yield server, proxy
  proxy.stop()
  server.stop()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_fake_mnist(str(tmp_path_factory.mktemp('data')), num_train=256, num_test=48)


def _env(monkeypatch, url, tmp_path):
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', url)  # What a user sets; train.py derives the rest.
  monkeypatch.setenv('DPTRAIN_CACHE_DIR', str(tmp_path / 'cache'))


def _error_lines(out: str):
  return [line for line in out.splitlines() if line.startswith('error:')]


def test_an_endpoint_that_does_not_answer_stops_the_start_within_30_s(monkeypatch, tmp_path, data_dir):
  _env(monkeypatch, f'http://127.0.0.1:{harness.free_port()}', tmp_path)  # Nothing listens there.
  t = time.monotonic()
  r = harness.run_train('gs://bucket/run', f'--config.data_dir={data_dir}', '--config.num_train_steps=4')
  elapsed = time.monotonic() - t
  out = r.stdout + r.stderr
  assert r.returncode != 0 and 'Traceback' not in out, out[-3000:]
  lines = _error_lines(out)
  assert len(lines) == 1 and 'does not answer' in lines[0], out[-3000:]
  assert elapsed < 30, f'{elapsed:.1f} s'


def test_transient_errors_are_retried_and_the_run_ends_as_without_them(proxied, monkeypatch, tmp_path, data_dir):
  server, proxy = proxied
  _env(monkeypatch, proxy.url, tmp_path)
  args = ('--num_cpu_devices=2', f'--config.data_dir={data_dir}', '--config.num_train_steps=24',
          '--config.checkpoint_every_steps=12')
  clean = f'gs://{server.new_bucket()}/run'
  faulty = f'gs://{server.new_bucket()}/run'
  r = harness.run_train(clean, *args)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  proxy.every(10)  # One request in ten fails: a 503, a 429 or a dropped connection in turn.
  before, faults = proxy.requests, proxy.faults
  try:
    r = harness.run_train(faulty, *args)
  finally:
    proxy.every(0)
  out = r.stdout + r.stderr
  assert r.returncode == 0 and 'Traceback' not in out and not _error_lines(out), out[-3000:]
  assert proxy.faults - faults >= 20 and proxy.requests - before > 200, (proxy.faults, proxy.requests)
  a, b = harness.load_checkpoint(clean), harness.load_checkpoint(faulty)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert [e['step'] for e in harness.metrics(faulty)] == [e['step'] for e in harness.metrics(clean)]



def _committed(workdir) -> list[int]:
  """Steps Orbax marked complete (commit_success.txt, written last on Cloud Storage)."""
  d = storage.join(workdir, 'checkpoints')
  return sorted(int(n) for n in storage.listdir(d)
                if n.isdigit() and storage.exists(storage.join(d, n, 'commit_success.txt')))


_CLEAN = {}  # args -> the workdir of an uninterrupted run with them, on the module's server.


@pytest.mark.parametrize('fault', ['down', 'stall'])
def test_a_server_that_dies_mid_run_stops_it_in_one_line_and_the_rerun_resumes(proxied, monkeypatch, tmp_path,
                                                                               data_dir, fault):
  """`down`: connections refused; `stall`: accepted and never answered (no request fails: the probe notices)."""
  server, proxy = proxied
  _env(monkeypatch, proxy.url, tmp_path)
  # A long lease: the stop must come from the storage bound, not from the lease renewal giving up.
  args = ('--num_cpu_devices=2', f'--config.data_dir={data_dir}', '--config.num_train_steps=24',
          '--config.checkpoint_every_steps=4', '--config.workdir_lease_s=600')
  workdir = f'gs://{server.new_bucket()}/run'
  if args not in _CLEAN:  # One uninterrupted run to compare with, for both faults (suite time).
    _CLEAN[args] = f'gs://{server.new_bucket()}/run'
    r = harness.run_train(_CLEAN[args], *args)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  clean = _CLEAN[args]
  log = tmp_path / 'down.log'
  proc = harness.start_train(workdir, *args, log_path=str(log))
  try:
    assert harness.wait_for(lambda: proc.poll() is not None or any(s >= 8 for s in _committed(workdir)),
                            timeout=180, interval=0.05)
    assert proc.poll() is None, 'the run ended before the server went down: ' + log.read_text()[-3000:]
    seen = _committed(workdir)
    (proxy.down if fault == 'down' else proxy.stall)()
    down_at = time.monotonic()
    try:
      proc.wait(timeout=150)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    elapsed = time.monotonic() - down_at
  finally:
    proxy.unstall()
    proxy.up()
    if proc.poll() is None:
      proc.kill()
  out = log.read_text()
  lines = _error_lines(out)
  assert elapsed < 120, f'{elapsed:.0f} s after the server went down: {out[-3000:]}'
  assert proc.returncode == 2 and 'Traceback' not in out, out[-3000:]
  assert len(lines) == 1 and proxy.url.split('//')[1] in lines[0] and 'rerun' in lines[0], out[-3000:]
  if fault == 'stall':
    assert 'no answer from' in lines[0], lines[0]  # The watchdog's line: no client request ever failed.
  after = _committed(workdir)
  print(f'stopped {elapsed:.1f} s after the server went down (committed steps {seen}, then {after}): {lines[0]}')
  assert max(after) >= max(seen), (seen, after)  # The newest committed step is kept (or a newer one committed).
  r = harness.run_train(workdir, *args)
  out = r.stdout + r.stderr
  assert r.returncode == 0 and 'Traceback' not in out and not _error_lines(out), out[-3000:]
  assert f'resuming at step {max(after)}' in out and 'unreadable' not in out, out[-3000:]
  a, b = harness.load_checkpoint(clean), harness.load_checkpoint(workdir)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  steps = [(e['step'], e['kind']) for e in harness.metrics(workdir)]
  assert steps == [(e['step'], e['kind']) for e in harness.metrics(clean)], steps

"""A bucket workdir when the storage network fails, through train.py against a real fake-gcs-server behind a
fault-injecting proxy (tests/storage_proxy.py): an endpoint that does not answer at start, and transient errors
(429, 503, dropped connections) during a run."""

import time

import numpy as np
import pytest

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


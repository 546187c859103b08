"""The storage verbs against a local directory and real storage servers (fake-gcs-server, moto S3)."""

import pytest

import storage
from errors import UserError


@pytest.fixture(params=['local', 'gs', 's3'])
def root(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path / 'root')
  return request.getfixturevalue({'gs': 'gcs_bucket', 's3': 's3_bucket'}[request.param]) + '/run'


def test_write_read_replace_and_exists(root):
  path = storage.join(root, 'a', 'config.json')
  storage.makedirs(storage.dirname(path))
  assert not storage.exists(path)
  with pytest.raises(FileNotFoundError):
    storage.read_bytes(path)
  storage.write_text(path, 'one')
  storage.write_text(path, 'two')
  assert storage.read_text(path) == 'two' and storage.exists(path) and storage.isfile(path)
  assert storage.isdir(storage.join(root, 'a')) and not storage.isfile(storage.join(root, 'a'))
  assert storage.listdir(storage.join(root, 'a')) == ['config.json']  # No temporary file left beside it.


def test_append_keeps_one_object(root):
  storage.makedirs(root)
  path = storage.join(root, 'metrics.jsonl')
  for k in range(3):
    storage.append_text(path, f'{{"step": {k}}}\n')
  assert storage.read_text(path).splitlines() == ['{"step": 0}', '{"step": 1}', '{"step": 2}']
  assert storage.listdir(root) == ['metrics.jsonl']


def test_list_move_and_delete_a_tree(root):
  for name in ('checkpoints/4/state/x', 'checkpoints/4/meta', 'checkpoints/8/meta'):
    path = storage.join(root, name)
    storage.makedirs(storage.dirname(path))
    storage.write_bytes(path, name.encode())
  assert storage.listdir(storage.join(root, 'checkpoints')) == ['4', '8']
  aside = storage.join(root, 'checkpoints_unreadable', '4-1')
  storage.move(storage.join(root, 'checkpoints', '4'), aside)
  assert storage.listdir(storage.join(root, 'checkpoints')) == ['8']
  assert storage.read_bytes(storage.join(aside, 'state', 'x')) == b'checkpoints/4/state/x'
  storage.rmtree(storage.join(root, 'checkpoints'))
  assert not storage.exists(storage.join(root, 'checkpoints', '8', 'meta'))
  assert storage.listdir(root) == ['checkpoints_unreadable']


def test_missing_bucket_is_one_line(gcs_server, s3_server, monkeypatch):
  for server in (gcs_server, s3_server):
    for k, v in server.env.items():
      monkeypatch.setenv(k, v)
    url = f'{server.scheme}://no-such-bucket-{server.scheme}/run'
    with pytest.raises(UserError) as e:
      storage.probe_writable(url)
    line = str(e.value)
    assert '\n' not in line and f'cannot write {url}/.write_test' in line, line
    assert f'create the bucket {server.scheme}://no-such-bucket-{server.scheme}' in line, line


def test_urls_are_never_made_local_paths(tmp_path, monkeypatch):
  import paths
  monkeypatch.setenv('DPTRAIN_CACHE_DIR', str(tmp_path / 'cache'))
  assert paths.resolve_path('gs://b/run') == 'gs://b/run'
  assert storage.join('gs://b/run/', 'checkpoints', '4') == 'gs://b/run/checkpoints/4'
  assert storage.dirname('gs://b/run/checkpoints') == 'gs://b/run'
  cache = storage.cache_dir('gs://b/run', 'tensorboard')
  assert cache.startswith(str(tmp_path / 'cache')) and 'gs:' not in cache


_WATCH = '''
import sys, time
sys.path.insert(0, {root!r})
from storage import health
health.DOWN_S = 3
health.watch({url!r})
health.failed(ConnectionError('injected'))
time.sleep(8)
print('still running')
'''


def _watchdog(url: str):
  import subprocess
  import sys
  import time

  from tests import harness
  t = time.monotonic()
  r = subprocess.run([sys.executable, '-c', _WATCH.format(root=harness.ROOT, url=url)], capture_output=True,
                     text=True, timeout=60)
  return r, time.monotonic() - t


def test_the_watchdog_stops_a_process_whose_endpoint_does_not_answer(monkeypatch):
  from tests import harness
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{harness.free_port()}')  # Nothing listens.
  r, elapsed = _watchdog('gs://bucket/run')
  assert r.returncode == 2 and 'still running' not in r.stdout and 'Traceback' not in r.stderr, r.stderr
  lines = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and 'no answer from http://127.0.0.1:' in lines[0] and 'rerun' in lines[0], r.stderr
  assert elapsed < 8, elapsed


def test_the_watchdog_lets_a_process_go_on_when_its_endpoint_answers(gcs_bucket):
  r, _ = _watchdog(gcs_bucket + '/run')  # One failure, then the endpoint answers: a transient error.
  assert r.returncode == 0 and 'still running' in r.stdout and 'error:' not in r.stderr, r.stderr

"""`--workdir=gs://BUCKET/PATH` and `s3://BUCKET/PATH` through train.py against real servers (fake-gcs-server,
moto): every output lands in the bucket with a local workdir's layout and the local run's bits, nothing lands
on a local path made from the URL, kill -9 (mid-save too) then resume ends where an uninterrupted run ends, and
eval-only reads the bucket."""

import os
import random
import re
import signal

import pytest

import storage
from tests import harness
from tests.conftest import make_fake_mnist

pytestmark = pytest.mark.slow
STEPS = 32  # Kill test: the first kill after step 16, the second mid-save of step 24 or later.


@pytest.fixture(scope='module', params=['gs', 's3'])
def env(request):
  """What a user sets: STORAGE_EMULATOR_HOST alone, or AWS_ENDPOINT_URL and keys (train.py derives the rest)."""
  server = request.getfixturevalue('gcs_server' if request.param == 'gs' else 's3_server')
  with pytest.MonkeyPatch.context() as mp:
    for k, v in server.env.items():
      mp.setenv(k, v)
    mp.setenv('DPTRAIN_CACHE_DIR', str(harness.ROOT) + '/.pytest_cache/dptrain_cache')
    yield server


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_fake_mnist(str(tmp_path_factory.mktemp('data')), num_train=256, num_test=48)


def _args(data_dir, *extra):
  return ('--num_cpu_devices=2', f'--config.data_dir={data_dir}', f'--config.num_train_steps={STEPS}', *extra)


def _ok(proc):
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0 and 'Traceback' not in out, out[-3000:]
  return out


EXTRA = ('--config.plot=True', '--config.profile_steps=2')


@pytest.fixture(scope='module')
def local_run(data_dir, tmp_path_factory):
  """The job uninterrupted in a local directory (once, for both servers)."""
  local = str(tmp_path_factory.mktemp('local') / 'run')
  _ok(harness.run_train(local, *_args(data_dir, *EXTRA)))
  return local


@pytest.fixture(scope='module')
def runs(env, data_dir, local_run):
  """The same job uninterrupted in a bucket and in a local directory."""
  bucket = f'{env.scheme}://{env.new_bucket()}/run'
  _ok(harness.run_train(bucket, *_args(data_dir, *EXTRA)))
  return bucket, local_run


def _layout(workdir):
  """Relative paths under `workdir`, with the names that hold times, hosts or content hashes generalized."""
  out = set()
  for n in storage.walk_files(workdir):
    n = re.sub(r'events\.out\.tfevents\..*', 'EVENTS', n)
    n = re.sub(r'profile/plugins/profile/[^/]+/.*', 'PROFILE', n)
    n = re.sub(r'/d/[0-9a-f]{32}$', '/d/DATA', n)
    out.add(n)
  return out


def test_bucket_holds_every_output_in_the_local_layout_and_the_same_bits(runs):
  bucket, local = runs
  layout, local_layout = _layout(bucket), _layout(local) - {'.lock'}  # A bucket's lock is released at the end.
  assert layout == local_layout, sorted(layout ^ local_layout)
  assert {'metrics.jsonl', 'config.json', 'learning_curves.png', 'tensorboard/EVENTS', 'PROFILE',
          f'checkpoints/{STEPS}/meta/metadata'} <= layout, sorted(layout)
  assert storage.read_bytes(storage.join(bucket, 'learning_curves.png'))[:8] == b'\x89PNG\r\n\x1a\n'
  harness.assert_states_close(harness.load_checkpoint(local), harness.load_checkpoint(bucket), atol=0)
  strip = lambda events: [{k: v for k, v in e.items() if k in ('step', 'test_loss', 'test_examples')}
                          for e in events if e['kind'] == 'eval']
  assert strip(harness.metrics(bucket)) == strip(harness.metrics(local))
  assert not any(n.startswith(('gs:', 's3:')) for n in os.listdir(harness.ROOT)), 'a local folder made from a URL'


def _kill_when(proc, predicate):
  assert harness.wait_for(lambda: predicate() or proc.poll() is not None, timeout=180, interval=0.002)
  assert proc.poll() is None, 'the run ended before it could be interrupted'
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _saving(workdir, after: int) -> bool:
  """A step past `after` being written: in a bucket Orbax writes a step in place and marks it complete with
  commit_success.txt last."""
  d = storage.join(workdir, 'checkpoints')
  return any(int(n) > after and not storage.exists(storage.join(d, n, 'commit_success.txt'))
             for n in storage.listdir(d) if n.isdigit())


def test_kill_9_anywhere_then_resume_is_bit_identical(env, runs, data_dir, tmp_path):
  bucket, _ = runs
  workdir = f'{env.scheme}://{env.new_bucket()}/run'
  target = random.Random(7).choice(range(8, 24, 4))
  proc = harness.start_train(workdir, *_args(data_dir), log_path=str(tmp_path / 'kill1.log'))
  _kill_when(proc, lambda: any(e['step'] >= target for e in harness.metrics(workdir)))
  proc = harness.start_train(workdir, *_args(data_dir), log_path=str(tmp_path / 'kill2.log'))
  last = max(harness.checkpoint_steps(workdir))
  _kill_when(proc, lambda: _saving(workdir, last + 4))  # Mid-save of a new step (not the resumed one).
  out = _ok(harness.run_train(workdir, *_args(data_dir)))
  assert 'resuming at step' in out
  harness.assert_states_close(harness.load_checkpoint(bucket), harness.load_checkpoint(workdir), atol=0)
  steps = [(e['step'], e['kind']) for e in harness.metrics(workdir)]
  assert steps == [(e['step'], e['kind']) for e in harness.metrics(bucket)], steps


def test_eval_only_reads_the_bucket_and_appends_one_event(env, runs, data_dir):
  bucket, _ = runs
  before = harness.metrics(bucket)
  _ok(harness.run_train(bucket, *_args(data_dir, '--config.eval_only=True')))
  after = harness.metrics(bucket)
  assert after[:-1] == before and after[-1]['eval_only'] and after[-1]['step'] == STEPS
  assert after[-1]['test_loss'] == before[-1]['test_loss']


def _one_error(proc) -> str:
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def test_a_missing_bucket_is_refused_with_one_line(env, data_dir):
  line = _one_error(harness.run_train(f'{env.scheme}://no-such-bucket/run', *_args(data_dir), timeout=120))
  assert f'create the bucket {env.scheme}://no-such-bucket' in line, line


def test_elastic_resume_on_another_device_count_matches_the_local_disk(env, runs, data_dir, tmp_path):
  """The finished 2-device run, continued for 4 steps on 1 device: from the bucket as from a local copy (the
  same bits; restoring onto another device count takes Orbax's abstract-array target, in a bucket too)."""
  import shutil
  bucket, local = runs
  local_copy = str(tmp_path / 'run')
  shutil.copytree(local, local_copy, ignore=shutil.ignore_patterns('.lock'))
  more = ('--num_cpu_devices=1', f'--config.data_dir={data_dir}', f'--config.num_train_steps={STEPS + 4}')
  for workdir in (bucket, local_copy):
    assert f'resuming at step {STEPS}' in _ok(harness.run_train(workdir, *more))
  harness.assert_states_close(harness.load_checkpoint(local_copy, STEPS + 4),
                              harness.load_checkpoint(bucket, STEPS + 4), atol=0)

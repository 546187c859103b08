"""What the processes of one job compare, and the lines a mismatch or a lost peer gives (no processes)."""

import json
import threading
import time
import types

import pytest

from configs import tiny
from errors import UserError
from parallel import agreement
from tests.conftest import make_fake_mnist
from trainer import checkpoints


def _record(**overrides):
  c = tiny.get_config()
  c.update(overrides)
  return agreement.config_record(c)


def test_config_difference_names_the_field_both_values_and_the_process():
  ref = _record()
  assert agreement.config_difference(ref, _record(), 1) == ''
  line = agreement.config_difference(ref, _record(learning_rate=0.2), 1)
  assert 'process 1 has --config.learning_rate=0.2, process 0 has 0.05' in line, line
  assert 'same config' in line
  line = agreement.config_difference(ref, _record(num_train_steps=8, seed=3, model='cnn'), 2)
  assert 'process 2 has --config.model=cnn, process 0 has mlp' in line, line  # The first in key order.
  assert 'also differ: --config.num_train_steps, --config.seed' in line, line
  extra = dict(ref, new_key=1)
  assert 'process 1 has --config.new_key=1, process 0 has <absent>' in agreement.config_difference(ref, extra, 1)


def test_per_host_fields_may_differ():
  ref = _record()
  theirs = _record(data_dir='/other/copy', data_threads=3, download=True, huge_pages='on')
  assert agreement.config_difference(ref, theirs, 1) == ''
  assert 'data_dir' not in ref and 'learning_rate' in ref


def test_data_difference_names_counts_classes_and_content(tmp_path):
  from input_pipeline import sources
  a = sources.load_idx('mnist', make_fake_mnist(str(tmp_path / 'a'), num_train=64, num_test=16))
  b = sources.load_idx('mnist', make_fake_mnist(str(tmp_path / 'b'), num_train=64, num_test=16))  # A copy.
  ref = agreement.data_record(a)
  assert agreement.data_difference(ref, agreement.data_record(b), 1) == ''  # Another directory, same data.
  fewer = sources.load_idx('mnist', make_fake_mnist(str(tmp_path / 'c'), num_train=63, num_test=16))
  line = agreement.data_difference(ref, agreement.data_record(fewer), 1)
  assert line.startswith('the data on process 1 differs from process 0 (63 vs 64 train examples; idx:'), line
  assert str(tmp_path / 'c') in line and 'same copy of the data' in line
  other = sources.load_idx('mnist', make_fake_mnist(str(tmp_path / 'd'), num_train=64, num_test=16, seed=1))
  line = agreement.data_difference(ref, agreement.data_record(other), 1)
  assert 'the same example counts and classes, but other files or content: digest' in line, line
  renamed = dict(ref, classes=['zero'] + ref['classes'][1:])
  assert "class 0 named 'zero' vs '0'" in agreement.data_difference(ref, renamed, 3)
  assert '9 vs 10 classes' in agreement.data_difference(ref, dict(ref, classes=ref['classes'][:9]), 3)


@pytest.mark.parametrize('error, lost', [
    (RuntimeError('Gloo AllGather failed: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out '
                  'waiting 60000ms for recv operation to complete'), True),
    (RuntimeError('DEADLINE_EXCEEDED: Barrier timed out. Id: sync_global_devices'), True),
    (OSError(28, 'No space left on device'), False),
])
def test_a_lost_peer_during_a_save_is_not_called_a_disk_problem(monkeypatch, tmp_path, error, lost):
  monkeypatch.setattr(agreement, '_state', lambda: object())  # As in a multi-process job.
  ckpts = checkpoints.Checkpoints.__new__(checkpoints.Checkpoints)
  ckpts.directory = str(tmp_path / 'checkpoints')
  line = str(ckpts._failed(8, error))
  if lost:
    assert line.startswith(f'lost contact with another process during saving checkpoint 8 to {ckpts.directory}')
    assert "check the other processes' logs" in line and 'disk' not in line, line
  else:
    assert 'free disk space' in line and 'lost contact' not in line, line
  monkeypatch.setattr(agreement, '_state', lambda: None)  # One process: there is no peer to lose.
  assert 'free disk space' in str(ckpts._failed(8, error))


class _FakeStore:
  """The coordination service's key-value store as `agreement` uses it, in memory."""

  def __init__(self, **items):
    self.items = dict(items)

  def key_value_set(self, key, value, allow_overwrite=False):
    if key in self.items and not allow_overwrite:
      raise RuntimeError(f'ALREADY_EXISTS: {key}')
    self.items[key] = value

  def key_value_try_get(self, key):
    if key not in self.items:
      raise RuntimeError(f'NOT_FOUND: {key}')
    return self.items[key]

  def blocking_key_value_get(self, key, timeout_in_ms):
    time.sleep(min(timeout_in_ms, 50) / 1000)
    if key not in self.items:
      raise RuntimeError(f'DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}')
    return self.items[key]


def _as_process(monkeypatch, me, store, n=2):
  monkeypatch.setattr(agreement, '_state', lambda: types.SimpleNamespace(client=store, process_id=me, num_processes=n))
  monkeypatch.setattr(agreement, '_decided', set())


def _agree_config(record, timeout_s=5):
  agreement.agree('config', record, agreement.config_difference, timeout_s)


def test_process_0_decides_and_every_process_reads_the_same_verdict(monkeypatch):
  ref, other = _record(), _record(learning_rate=0.2)
  store = _FakeStore(**{'dptrain/agree/config/1': json.dumps(other), 'dptrain/agree/config/2': json.dumps(ref)})
  _as_process(monkeypatch, 0, store, n=3)
  with pytest.raises(UserError, match='process 1 has --config.learning_rate=0.2, process 0 has 0.05'):
    _agree_config(ref)
  verdict = store.items.pop('dptrain/agree/config/verdict')
  threading.Timer(0.3, store.key_value_set, ('dptrain/agree/config/verdict', verdict)).start()
  _as_process(monkeypatch, 2, store, n=3)  # Process 2 agrees with process 0, and waits for the job's verdict.
  with pytest.raises(UserError) as e:
    _agree_config(ref)
  assert str(e.value) == verdict
  ok = _FakeStore(**{'dptrain/agree/config/1': json.dumps(ref)})
  _as_process(monkeypatch, 0, ok)
  _agree_config(ref)
  assert ok.items['dptrain/agree/config/verdict'] == ''


def test_a_silent_peer_ends_the_wait_with_one_line_and_a_stopped_one_at_once(monkeypatch):
  store = _FakeStore()
  _as_process(monkeypatch, 0, store)
  t0 = time.monotonic()
  with pytest.raises(UserError, match=r'process 1 did not report its config within 1s .*--distributed_timeout'):
    _agree_config(_record(), timeout_s=1)
  assert 1 <= time.monotonic() - t0 < 3
  store = _FakeStore()
  _as_process(monkeypatch, 1, store)
  agreement.stopped('error: --config.data_dir=/x does not exist')  # Decides both stages for everyone.
  assert store.items['dptrain/agree/data/verdict'].startswith('process 1 stopped before training (error: ')
  _as_process(monkeypatch, 0, store)
  t0 = time.monotonic()
  with pytest.raises(UserError, match=r'process 1 stopped before training \(error: --config.data_dir=/x'):
    _agree_config(_record(), timeout_s=60)
  assert time.monotonic() - t0 < 2

"""The resume guard through train.py: a refused start changes no file of the workdir, the check works
without config.json (the newest checkpoint's meta records the frozen fields and the data), other data is
refused unless allowed on purpose, and eval-only on other data needs the same class names."""

import glob
import json
import os
import shutil

import pytest

from tests import harness
from tests.conftest import make_fake_mnist
from tests.image_folders import make_image_folder

pytestmark = pytest.mark.slow
DEVICES = '--num_cpu_devices=2'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_fake_mnist(str(tmp_path_factory.mktemp('data')), num_train=256, num_test=48)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """configs/tiny.py (the MLP) trained to step 4 (checkpoint 4); tests copy it before changing anything."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  proc = harness.run_train(workdir, DEVICES, f'--config.data_dir={data_dir}', '--config.num_train_steps=4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _copy(trained, tmp_path):
  return shutil.copytree(trained, str(tmp_path / 'run'))


def _refused(workdir, *args) -> str:
  """Runs train.py, asserts the refusal contract (exit 2, one `error:` line, no traceback) and that no file
  of the workdir changed; returns the error line."""
  before = harness.workdir_files(workdir)
  proc = harness.run_train(workdir, DEVICES, *args)
  out = proc.stdout + proc.stderr
  assert 'Traceback' not in out and proc.returncode == 2, (proc.returncode, out[-3000:])
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert harness.workdir_files(workdir) == before
  return lines[0]


def _ok(proc) -> str:
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0 and 'Traceback' not in out, out[-3000:]
  return out


def _history(workdir):
  path = os.path.join(workdir, 'config_history.jsonl')
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_frozen_field_change_is_refused_with_and_without_config_json(tmp_path, trained, data_dir):
  workdir = _copy(trained, tmp_path)
  d = f'--config.data_dir={data_dir}'
  line = _refused(workdir, d, '--config.seed=1', '--config.batch_size=32', '--config.num_train_steps=8')
  assert '--config.seed 0 -> 1' in line and '--config.batch_size 64 -> 32' in line, line
  assert '--config.seed=0 --config.batch_size=64' in line, line  # The values to rerun with, from the checkpoint.
  os.remove(os.path.join(workdir, 'config.json'))
  line = _refused(workdir, d, '--config.seed=1', '--config.batch_size=32', '--config.num_train_steps=8')
  assert '--config.seed 0 -> 1' in line and '--config.batch_size 64 -> 32' in line, line
  # The hostile-user lock-out: model change without config.json is refused and writes nothing, so the
  # original command still resumes (and names the missing config.json in a warning).
  line = _refused(workdir, d, '--config.model=cnn', '--config.num_train_steps=8')
  assert "--config.model 'mlp' -> 'cnn'" in line, line
  out = _ok(harness.run_train(workdir, DEVICES, d, '--config.num_train_steps=8'))
  assert 'resuming at step 4' in out and 'config.json is missing' in out, out[-3000:]
  assert json.load(open(os.path.join(workdir, 'config.json')))['model'] == 'mlp'


def test_a_config_json_that_disagrees_with_the_checkpoint_does_not_lock_the_run_out(tmp_path, trained, data_dir):
  """What an older version's refused run left behind: config.json says cnn, the checkpoints hold the MLP."""
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, 'config.json')
  saved = json.load(open(path))
  with open(path, 'w') as f:
    json.dump(dict(saved, model='cnn'), f)
  out = _ok(harness.run_train(workdir, DEVICES, f'--config.data_dir={data_dir}', '--config.num_train_steps=8'))
  assert "says model='cnn', but checkpoint 4 was trained with 'mlp'" in out and 'resuming at step 4' in out, out[-3000:]
  assert json.load(open(path))['model'] == 'mlp'
  assert [list(h['changes']) for h in _history(workdir)] == [['num_train_steps']]  # Not the model: it never changed.


def test_class_count_and_shape_mismatches_change_nothing(tmp_path, trained, data_dir):
  workdir = _copy(trained, tmp_path)
  folder = make_image_folder(str(tmp_path / 'folder3'), num_classes=3, per_class=(30, 4), size=(28, 28), channels=1)
  line = _refused(workdir, '--config.data_source=folder', f'--config.data_dir={folder}')
  assert 'step 4 has 10 classes (this run: 3)' in line, line
  line = _refused(workdir, f'--config.data_dir={data_dir}', '--config.optimizer=adam')
  assert "optimizer 'sgd' (this run: 'adam')" in line, line
  assert not _history(workdir)


def test_old_checkpoints_resume_and_config_json_still_guards_them(tmp_path, trained, data_dir):
  """Checkpoints written before the meta recorded frozen fields and data: only what they record is compared."""
  workdir = _copy(trained, tmp_path)
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '*', 'meta', 'metadata')):
    if os.path.isfile(path):
      meta = json.load(open(path))
      with open(path, 'w') as f:
        json.dump({k: v for k, v in meta.items() if k not in ('config', 'data')}, f)
  d = f'--config.data_dir={data_dir}'
  line = _refused(workdir, d, '--config.seed=1')  # Not recorded in the old meta: config.json guards it.
  assert '--config.seed 0 -> 1' in line, line
  out = _ok(harness.run_train(workdir, DEVICES, d, '--config.num_train_steps=8'))
  assert 'predates the record of frozen fields and data' in out and 'resuming at step 4' in out, out[-3000:]


def _other_data(tmp_path, num_train=256, **kwargs):
  return make_fake_mnist(str(tmp_path / 'other'), num_train=num_train, num_test=48, seed=1, **kwargs)


def test_other_data_is_refused_unless_allowed_and_the_change_is_recorded(tmp_path, trained):
  workdir = _copy(trained, tmp_path)
  other = _other_data(tmp_path, num_train=320)  # "Images were added": more examples, other content.
  os.remove(os.path.join(workdir, 'config.json'))  # The checkpoint alone knows the data.
  line = _refused(workdir, f'--config.data_dir={other}', '--config.num_train_steps=8')
  assert 'trained on other data: 48 eval / 256 train examples, this run has 48 eval / 320 train' in line, line
  assert '--config.allow_data_change=True' in line, line
  same_counts = _other_data(tmp_path / 'b')
  line = _refused(workdir, f'--config.data_dir={same_counts}', '--config.num_train_steps=8')
  assert 'the same example counts but other content' in line, line
  out = _ok(harness.run_train(workdir, DEVICES, f'--config.data_dir={other}', '--config.allow_data_change=True',
                              '--config.num_train_steps=8'))
  assert 'resuming at step 4' in out and 'Config changed on resume at step 4' in out, out[-3000:]
  [entry] = _history(workdir)
  assert entry['step'] == 4, entry
  assert entry['data']['from']['examples'] == {'train': 256, 'eval': 48}, entry
  assert entry['data']['to']['examples'] == {'train': 320, 'eval': 48}, entry
  assert entry['data']['from']['digest'] != entry['data']['to']['digest'] and entry['data']['to']['num_classes'] == 10
  # Checkpoint 8 records the new data: the next resume needs no flag.
  _ok(harness.run_train(workdir, DEVICES, f'--config.data_dir={other}', '--config.num_train_steps=12'))


def _rename_class(workdir, k, name):
  """Edits the checkpoints' record as if trained on a dataset whose class `k` is named `name`; returns the
  name the data really has."""
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '*', 'meta', 'metadata')):
    meta = json.load(open(path))
    real, meta['data']['classes'][k] = meta['data']['classes'][k], name
    with open(path, 'w') as f:
      json.dump(meta, f)
  return real


def test_other_class_names_refuse_resume_and_eval_only_even_with_the_flag(tmp_path, trained, data_dir):
  workdir = _copy(trained, tmp_path)
  real = _rename_class(workdir, 3, 'cat')
  d = f'--config.data_dir={data_dir}'
  for extra in ((), ('--config.allow_data_change=True',), ('--config.eval_only=True',)):
    line = _refused(workdir, d, *extra)
    assert f"step 4 has class 3 named 'cat' (this run: {real!r})" in line, line


def test_eval_only_on_other_data_with_the_same_classes_records_what_it_evaluated(tmp_path, trained):
  workdir = _copy(trained, tmp_path)
  other = _other_data(tmp_path, num_train=320, gz=False)
  config_before = open(os.path.join(workdir, 'config.json')).read()
  _ok(harness.run_train(workdir, DEVICES, f'--config.data_dir={other}', '--config.eval_only=True',
                        '--config.data_source=idx'))
  event = harness.metrics(workdir)[-1]
  assert event['eval_only'] and event['step'] == 4, event
  assert (event['data_source'], event['data_dir'], event['test_examples']) == ('idx', other, 48), event
  assert event['data'] == f'idx:{other}', event
  # Eval-only changes nothing of the run: config.json and its history stay as training left them.
  assert open(os.path.join(workdir, 'config.json')).read() == config_before and not _history(workdir)

"""Bad input through the real entry point: exit 2, one `error:` line, no traceback, the workdir untouched.

Every case is a `train.py` subprocess. They run two at a time in a pool started by the `runs` fixture
(only the cases of the selected tests), so the whole file takes about as long as half its subprocesses.
"""

import concurrent.futures
import gzip
import hashlib
import importlib.util
import os
import shutil
import time

import numpy as np
import pytest

from benchmarks import kit
from input_pipeline import idx
from tests.conftest import make_fake_mnist
from tests.harness import free_port, load_checkpoint, run_train

pytestmark = pytest.mark.slow  # Bad inputs are fed through train.py, as a user would.

VALUE_CASES = {  # --config.KEY=VALUE -> what the error line must say besides the key
    'batch_size=0': '>= 1', 'batch_size=-64': '>= 1', 'eval_batch_size=0': '>= 1',
    'learning_rate=0': '> 0', 'learning_rate=-0.1': '> 0', 'learning_rate=nan': '> 0',
    'num_epochs=0': '>= 1', 'optimizer=lamb': 'sgd, adam, adamw', 'parallel_backend=dp': 'shard_map, pmap',
    'bn_mode=sync': 'global, local', 'dtype=float16': 'float32, bfloat16', 'model=resnet': 'cnn, mlp',
    'seed=-1': '[0, 2**31)', 'workdir_lease_s=0': '> 0', 'workdir_lease_s=-5': '> 0',
}
# These also go through train.py (exit status, one line, no workdir): a number, a NaN and a name. The rest
# are checked against `config_check.validate` in-process by test_every_config_value_is_checked.
THROUGH_TRAIN_PY = ('batch_size=-64', 'learning_rate=nan', 'optimizer=lamb')


class Ctx:
  """Paths shared by the cases: `root` holds one directory per case, `data` the intact fake dataset."""

  def __init__(self, root):
    self.root = root
    self.data = make_fake_mnist(os.path.join(root, 'data'), num_train=256, num_test=48)

  def workdir(self, name):
    return os.path.join(self.root, name, 'workdir')

  def data_copy(self, name):
    """A private copy of the fake dataset for a case to damage."""
    return shutil.copytree(self.data, os.path.join(self.root, name, 'data'))


def _run(ctx, name, *args, config=None, workdir=None, before=None):
  """Runs train.py; returns (CompletedProcess, seconds, workdir, file hashes of `before` taken first)."""
  workdir = workdir or ctx.workdir(name)
  snapshot = _hashes(before) if before else None
  start = time.monotonic()
  kwargs = {'config': config} if config else {}
  proc = run_train(workdir, *args, timeout=180, **kwargs)
  return proc, time.monotonic() - start, workdir, snapshot


def _data(ctx, name, damage):
  d = ctx.data_copy(name)
  damage(d)
  return _run(ctx, name, f'--config.data_dir={d}')


def _truncate_gzip(d):
  path = os.path.join(d, 'train-images-idx3-ubyte.gz')
  with open(path, 'rb') as f:
    payload = f.read()
  with open(path, 'wb') as f:
    f.write(payload[:len(payload) // 2])


def _bad_magic(d):
  path = os.path.join(d, 'train-labels-idx1-ubyte.gz')
  with gzip.open(path) as f:
    payload = f.read()
  with gzip.open(path, 'wb') as f:
    f.write(b'\x12\x34' + payload[2:])


def _hashes(root) -> dict:
  """sha256 of every file under `root`, but the workdir lock (a run holds it, and leaves the empty file)."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      if f == '.lock':
        continue
      with open(os.path.join(dirpath, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(dirpath, f), root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _trained(ctx):
  """A workdir holding checkpoints 4 and 8 of configs/tiny.py (the MLP) on the fake data."""
  workdir = ctx.workdir('trained')
  proc = run_train(workdir, f'--config.data_dir={ctx.data}', '--config.num_train_steps=8', timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _rerun(ctx, name, damage, *args):
  """Copies the trained workdir, damages the copy, reruns the same 8-step job (plus `args`) in it."""
  workdir = shutil.copytree(ctx.runs.result('trained'), ctx.workdir(name))
  damage(os.path.join(workdir, 'checkpoints'))
  return _run(ctx, name, f'--config.data_dir={ctx.data}', '--config.num_train_steps=8', *args, workdir=workdir,
              before=workdir)


def _truncate_state(ckpts):
  for dirpath, _, files in os.walk(os.path.join(ckpts, '8', 'state')):
    for f in files:
      os.truncate(os.path.join(dirpath, f), 0)


def _half_written(ckpts):
  """Step 12 as an interrupted save leaves it: metadata there, the array index and commit markers not."""
  shutil.copytree(os.path.join(ckpts, '8'), os.path.join(ckpts, '12'))
  for f in ('commit_success.txt', 'state/commit_success.txt', 'state/_METADATA', 'state/manifest.ocdbt'):
    os.remove(os.path.join(ckpts, '12', f))
  shutil.copytree(os.path.join(ckpts, '8', 'meta'), os.path.join(ckpts, '16.orbax-checkpoint-tmp-1'))


def _syntax_error_config(ctx):
  path = os.path.join(ctx.root, 'syntax.py')
  with open(path, 'w') as f:
    f.write('def get_config(:\n  pass\n')
  return _run(ctx, 'syntax', config=path)


def _config_missing_keys(ctx):
  path = os.path.join(ctx.root, 'partial.py')
  with open(path, 'w') as f:
    f.write('import ml_collections\n\ndef get_config():\n  c = ml_collections.ConfigDict()\n  c.model = "mlp"\n'
            '  c.batch_size = 64\n  return c\n')
  return _run(ctx, 'partial', config=path)


def _idx_header(d, stem, header: bytes, payload: bytes = b''):
  """Replaces the (gzipped) IDX file `stem` in `d` with `header` + `payload`."""
  with gzip.open(os.path.join(d, stem + '.gz'), 'wb') as f:
    f.write(header + payload)


def _idx_overflow(d):  # 2**31 x 2**31 x 4 = 2**64 wraps to 0 in numpy's int64: "0 bytes expected", no payload.
  dims = (2**31, 2**31, 4)
  _idx_header(d, 'train-images-idx3-ubyte', bytes([0, 0, 8, 3]) + b''.join(n.to_bytes(4, 'big') for n in dims))


def _idx_many_dims(d):  # Magic 0x00000999: 153 dimensions.
  _idx_header(d, 'train-images-idx3-ubyte', bytes([0, 0, 9, 0x99]) + b'\x00\x00\x00\x01' * 0x99)


def _idx_float_images(d):
  images = np.random.default_rng(0).random((256, 28, 28)).astype('>f4')
  _idx_header(d, 'train-images-idx3-ubyte', bytes([0, 0, 0x0D, 3]) + b''.join(
      n.to_bytes(4, 'big') for n in images.shape), images.tobytes())


def _tfds_offline(ctx):
  empty = os.path.join(ctx.root, 'tfds_data')
  os.makedirs(empty)
  return _run(ctx, 'tfds', '--config.data_source=tfds', f'--config.data_dir={empty}')


def _file_as_workdir(ctx):
  path = os.path.join(ctx.root, 'a_file')
  with open(path, 'w') as f:
    f.write('not a directory')
  return _run(ctx, 'file', workdir=os.path.join(path, 'sub'))


def _one_class_folder(ctx):
  from tests.image_folders import make_image_folder
  root = make_image_folder(os.path.join(ctx.root, 'one_class', 'data'), num_classes=1, per_class=(4, 2))
  return _run(ctx, 'one_class', '--config.data_source=folder', f'--config.data_dir={root}', '--config.batch_size=4',
              '--config.eval_batch_size=2', '--num_cpu_devices=1')


def _huge_png_header(ctx):
  """A PNG whose header says 10000 x 10000 (100 megapixels, over PIL's DecompressionBombWarning limit): the
  header sniff reads only that. The run then stops for the mixed sizes (no --config.image_size)."""
  import struct
  import zlib

  from tests.image_folders import make_image_folder
  root = make_image_folder(os.path.join(ctx.root, 'huge', 'data'), num_classes=2, per_class=(4, 2))

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  with open(os.path.join(root, 'train', 'class_01', 'huge.png'), 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 10000, 10000, 8, 0, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'\0' * 16)) + chunk(b'IEND', b''))
  return _run(ctx, 'huge', '--config.data_source=folder', f'--config.data_dir={root}', '--config.batch_size=4',
              '--config.eval_batch_size=2', '--num_cpu_devices=1')


CASES = {  # name -> fn(ctx); the slow chain first so that it overlaps everything else
    'trained': _trained,
    'config_missing': lambda c: _run(c, 'config_missing', config='configs/no_such_config.py'),
    'config_syntax': _syntax_error_config,
    'config_unknown_key': lambda c: _run(c, 'unknown_key', '--config.batchsize=32'),
    'config_bad_type': lambda c: _run(c, 'bad_type', '--config.batch_size=abc'),
    'config_alias_lr': lambda c: _run(c, 'alias_lr', '--config.lr=0.1'),
    'config_nearest': lambda c: _run(c, 'nearest', '--config.profile=3'),
    **{f'value:{kv}': (lambda kv: lambda c: _run(c, kv, f'--config.{kv}'))(kv)  # noqa: B023 (bound)
       for kv in THROUGH_TRAIN_PY},
    'verbose': lambda c: _run(c, 'verbose', '--config.batch_size=0', '--verbose'),
    'verbose_1': lambda c: _run(c, 'verbose_1', '--config.batch_size=0', '--verbose=1'),
    'config_missing_keys': _config_missing_keys,
    'idx_overflow': lambda c: _data(c, 'idx_overflow', _idx_overflow),
    'idx_many_dims': lambda c: _data(c, 'idx_many_dims', _idx_many_dims),
    'idx_float_images': lambda c: _data(c, 'idx_float_images', _idx_float_images),
    'batch_larger_than_data': lambda c: _run(c, 'big_batch', f'--config.data_dir={c.data}', '--config.batch_size=512'),
    'batch_indivisible': lambda c: _run(c, 'indiv', f'--config.data_dir={c.data}', '--num_cpu_devices=3'),
    'eval_batch_indivisible': lambda c: _run(c, 'eval_indiv', f'--config.data_dir={c.data}', '--num_cpu_devices=4',
                                             '--config.eval_batch_size=50'),
    'cpu_devices_with_gpu': lambda c: _run(c, 'cpu_gpu', '--num_cpu_devices=2', '--platform=gpu'),
    'gpu_missing': lambda c: _run(c, 'gpu', '--platform=gpu'),
    'process_id': lambda c: _run(c, 'pid', f'--coordinator_address=127.0.0.1:{free_port()}', '--num_processes=2',
                                 '--process_id=2'),
    'coordinator_silent': lambda c: _run(c, 'coord', f'--coordinator_address=127.0.0.1:{free_port()}',
                                         '--num_processes=2', '--process_id=1', '--distributed_timeout=5'),
    'workdir_is_file': _file_as_workdir,
    'data_dir_missing': lambda c: _run(c, 'nodata', f'--config.data_dir={os.path.join(c.root, "no_such_dir")}'),
    'idx_missing': lambda c: _data(c, 'idx_missing', lambda d: os.remove(
        os.path.join(d, 't10k-labels-idx1-ubyte.gz'))),
    'gzip_truncated': lambda c: _data(c, 'gzip_truncated', _truncate_gzip),
    'bad_magic': lambda c: _data(c, 'bad_magic', _bad_magic),
    'label_count': lambda c: _data(c, 'label_count', lambda d: idx.write_idx(
        os.path.join(d, 'train-labels-idx1-ubyte.gz'), np.zeros(250, np.uint8))),
    'label_range': lambda c: _data(c, 'label_range', lambda d: idx.write_idx(
        os.path.join(d, 't10k-labels-idx1-ubyte.gz'), np.full(48, 12, np.uint8))),
    'tfds_offline': _tfds_offline,
    'one_class_folder': _one_class_folder,
    'one_label_idx': lambda c: _data(c, 'one_label_idx', lambda d: idx.write_idx(
        os.path.join(d, 'train-labels-idx1-ubyte.gz'), np.zeros(256, np.uint8))),
    'huge_png_header': _huge_png_header,
    'dataset_unknown': lambda c: _run(c, 'dataset', '--config.dataset=no_such_dataset'),
    'data_dir_remote_offline': lambda c: _run(c, 'remote', '--config.data_dir=gs://no-such-bucket/data'),
    'other_model': lambda c: _rerun(c, 'other_model', lambda ckpts: None, '--config.model=cnn'),
    'latest_corrupt': lambda c: _rerun(c, 'latest_corrupt', _truncate_state),
    'latest_half_written': lambda c: _rerun(c, 'half_written', _half_written),
}
DEPENDS = {'other_model': 'trained', 'latest_corrupt': 'trained', 'latest_half_written': 'trained'}


class _Runs:
  """Runs cases two at a time; `result(name)` waits for one (starting it if it was not queued)."""

  def __init__(self, ctx, names):
    self.ctx, self._futures = ctx, {}
    ctx.runs = self  # Dependent cases wait on others through it.
    self._pool = concurrent.futures.ThreadPoolExecutor(2)
    for name in CASES:  # Dict order: the chain first, then its dependents last.
      if name in names:
        self._submit(name)

  def _submit(self, name):
    if name not in self._futures:
      self._futures[name] = self._pool.submit(CASES[name], self.ctx)
    return self._futures[name]

  def result(self, name):
    return self._submit(name).result()

  def close(self):
    self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope='module')
def runs(request, tmp_path_factory):
  """Starts the cases of this module's selected tests at once (two at a time)."""
  names = set()
  for item in request.session.items:
    if item.module is request.module and hasattr(item, 'callspec'):
      names.add(item.callspec.params.get('case'))
  names |= {DEPENDS[n] for n in names if n in DEPENDS}
  pool = _Runs(Ctx(str(tmp_path_factory.mktemp('bad_input'))), names)
  yield pool
  pool.close()


def _error_line(proc) -> str:
  """Asserts the contract of a refused run and returns its one `error:` line."""
  output = proc.stdout + proc.stderr
  assert 'Traceback (most recent call last)' not in output, output[-3000:]
  assert 'Fatal Python error' not in output, output[-3000:]
  assert proc.returncode == 2, (proc.returncode, output[-3000:])
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def _assert_refused(result, *expected):
  proc, _, workdir, _ = result
  line = _error_line(proc)
  for text in expected:
    assert text in line, f'{text!r} not in {line!r}'
  files = _hashes(workdir) if os.path.isdir(workdir) else {}
  assert not files, f'a refused run wrote {sorted(files)} into {workdir}'
  return line


def _case(*names):
  return pytest.mark.parametrize('case', names)


@_case('config_missing')
def test_config_file_missing(runs, case):
  _assert_refused(runs.result(case), '--config=configs/no_such_config.py: no such file', 'configs/default.py')


@_case('config_syntax')
def test_config_syntax_error(runs, case):
  _assert_refused(runs.result(case), 'syntax.py', 'syntax error at line 1', 'fix the config file')


@_case('config_unknown_key')
def test_unknown_config_key(runs, case):
  _assert_refused(runs.result(case), '--config.batchsize', 'does not exist', '--config.batch_size?')


@_case('config_alias_lr', 'config_nearest')
def test_unknown_config_key_suggests_the_nearest(runs, case):
  """ml_collections finds no match for these: a name other trainers use (lr) and a prefix (profile)."""
  key, meant = {'config_alias_lr': ('lr', 'learning_rate'), 'config_nearest': ('profile', 'profile_steps')}[case]
  _assert_refused(runs.result(case), f'--config.{key}:', 'does not exist', f'did you mean --config.{meant}?')


@_case('config_bad_type')
def test_config_value_of_wrong_type(runs, case):
  _assert_refused(runs.result(case), '--config.batch_size=abc', 'type')


def _assert_names_value(line: str, kv: str):
  key, value = kit.key_value(kv)
  for text in (f'--config.{key}=', 'is invalid', VALUE_CASES[kv], value.lstrip('-')):
    assert text in line, f'{text!r} not in {line!r}'


@_case(*[f'value:{kv}' for kv in THROUGH_TRAIN_PY])
def test_config_value_out_of_range(runs, case):
  _assert_names_value(_assert_refused(runs.result(case)), case.split(':', 1)[1])


@pytest.mark.parametrize('kv', list(VALUE_CASES))
def test_every_config_value_is_checked(kv):
  """The same message train.py prints, from the check it calls before touching anything."""
  from errors import UserError
  from trainer import config_check
  config = kit.overrides([kv])  # As train.py reads --config.KEY=VALUE.
  with pytest.raises(UserError) as e:
    config_check.validate(config)
  _assert_names_value(str(e.value), kv)


@_case('dataset_unknown')
def test_unknown_dataset(runs, case):
  _assert_refused(runs.result(case), "unknown dataset 'no_such_dataset'", 'fashion_mnist', '--config.dataset')


@_case('data_dir_remote_offline')
def test_remote_data_dir_that_cannot_be_read(runs, case):
  # The first listing of the bucket (is it IDX files?) fails: one line naming the path, the endpoint, the fix.
  _assert_refused(runs.result(case), 'gs://no-such-bucket/data', 'does not answer', 'check the network')


@_case('config_missing_keys')
def test_config_file_missing_keys(runs, case):
  line = _assert_refused(runs.result(case), 'partial.py does not define', 'data_source', 'configs/default.py')
  assert 'seed' in line and 'model,' not in line


@_case('idx_overflow')
def test_idx_dimension_product_overflows(runs, case):
  _assert_refused(runs.result(case), 'train-images-idx3-ubyte.gz holds 0 bytes of data',
                  '(2147483648, 2147483648, 4)', 'reinstall')


@_case('idx_many_dims')
def test_idx_absurd_number_of_dimensions(runs, case):
  line = _assert_refused(runs.result(case), 'train-images-idx3-ubyte.gz declares 153 dimensions', '00000999')
  assert len(line) < 400, line


@_case('idx_float_images')
def test_idx_float_images_refused(runs, case):
  _assert_refused(runs.result(case), 'train-images-idx3-ubyte.gz holds float32 pixels', '0..255')


@_case('batch_larger_than_data')
def test_batch_larger_than_the_dataset_leaves_no_workdir(runs, case):
  result = runs.result(case)
  _assert_refused(result, '--config.batch_size=512', 'smaller batch')
  assert not os.path.exists(result[2]), 'a refused run left its workdir behind'


@_case('verbose', 'verbose_1')
def test_verbose_shows_the_traceback(runs, case):
  proc = runs.result(case)[0]
  assert proc.returncode != 0
  assert 'Traceback (most recent call last)' in proc.stderr and 'UserError' in proc.stderr, proc.stderr[-2000:]


@_case('batch_indivisible')
def test_batch_not_divisible_by_devices(runs, case):
  _assert_refused(runs.result(case), '--config.batch_size=64', '3 devices', '63 or 66')


@_case('eval_batch_indivisible')
def test_eval_batch_not_divisible_by_devices(runs, case):
  _assert_refused(runs.result(case), '--config.eval_batch_size=50', '4 devices', '48 or 52')


@_case('cpu_devices_with_gpu')
def test_cpu_devices_with_gpu_platform(runs, case):
  _assert_refused(runs.result(case), '--num_cpu_devices', '--platform=gpu', 'drop --num_cpu_devices')


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin',
                                                               'jax_rocm60_plugin')), reason='a GPU plugin exists')
@_case('gpu_missing')
def test_gpu_platform_not_available(runs, case):
  _assert_refused(runs.result(case), '--platform=gpu is not available', '--platform=cpu')


@_case('process_id')
def test_process_id_out_of_range(runs, case):
  _assert_refused(runs.result(case), '--process_id=2', '--num_processes=2', '0..1')


@_case('coordinator_silent')
def test_coordinator_nobody_listens(runs, case):
  result = runs.result(case)
  _assert_refused(result, 'nobody listens', '--coordinator_address=127.0.0.1:', '5s', 'process 0')
  assert 5 <= result[1] < 5 + 15, f'took {result[1]:.1f}s with --distributed_timeout=5'


@_case('workdir_is_file')
def test_workdir_not_writable(runs, case):
  result = runs.result(case)
  workdir = result[2]
  _assert_refused(result, f'--workdir={workdir}', 'is a file', 'choose another --workdir')
  with open(os.path.dirname(workdir)) as f:
    assert f.read() == 'not a directory'


@_case('data_dir_missing')
def test_data_dir_missing(runs, case):
  _assert_refused(runs.result(case), 'no_such_dir does not exist', '--config.data_dir')


@_case('idx_missing')
def test_idx_file_missing(runs, case):
  _assert_refused(runs.result(case), 't10k-labels-idx1-ubyte(.gz) is missing', '--config.data_dir')


@_case('gzip_truncated')
def test_gzip_truncated(runs, case):
  _assert_refused(runs.result(case), 'train-images-idx3-ubyte.gz is truncated or corrupt', 'reinstall')


@_case('bad_magic')
def test_wrong_magic(runs, case):
  _assert_refused(runs.result(case), 'train-labels-idx1-ubyte.gz is not an IDX file', '12340801')


@_case('label_count')
def test_label_count_mismatch(runs, case):
  _assert_refused(runs.result(case), 'has 256 images but', 'has 250 labels')


@_case('label_range')
def test_labels_out_of_range(runs, case):
  _assert_refused(runs.result(case), 't10k-labels-idx1-ubyte.gz has labels in [12, 12], outside [0, 10)')


@_case('tfds_offline')
def test_tfds_not_prepared_offline(runs, case):
  _assert_refused(runs.result(case), "TFDS dataset 'fashion_mnist' is not prepared", 'downloads are off',
                  '--config.download=True')
  assert not os.listdir(os.path.join(runs.ctx.root, 'tfds_data')), 'TFDS wrote into the empty data_dir'


@_case('one_class_folder', 'one_label_idx')
def test_fewer_than_two_classes_is_refused(runs, case):
  """One class trains to loss 0 and accuracy 1.0 and learns nothing: refused, for folders and in-memory labels."""
  line = _assert_refused(runs.result(case), 'has 1 class', 'a classifier needs at least 2', '--config.data_dir')
  assert ("folder:" in line and "('class_00')" in line) if case == 'one_class_folder' else 'idx:' in line, line


@_case('huge_png_header')
def test_image_library_warning_is_one_line(runs, case):
  proc = runs.result(case)[0]
  _assert_refused(runs.result(case), 'image_size')
  out = proc.stdout + proc.stderr
  assert 'DecompressionBomb' not in out and 'warnings.warn' not in out, out[-3000:]
  lines = [x for x in out.splitlines() if 'huge.png' in x]
  assert len(lines) == 1 and '10000x10000 pixels (100 megapixels)' in lines[0], lines


@_case('other_model')
def test_checkpoints_of_another_model(runs, case):
  proc, _, workdir, before = runs.result(case)
  line = _error_line(proc)
  assert "another config: --config.model 'mlp' -> 'cnn'" in line and 'new --workdir' in line, line
  assert _hashes(workdir) == before, 'a refused run changed the workdir'


def _assert_resumed(result, good_step, bad_step):
  proc, _, workdir, before = result
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  ckpts = os.path.join(workdir, 'checkpoints')
  assert f'checkpoint {ckpts}/{bad_step} is unreadable' in proc.stdout, proc.stdout[-2000:]
  assert f'Restored checkpoint {ckpts}/{good_step}' in proc.stderr, proc.stderr[-2000:]
  after = _hashes(workdir)
  for older in (4, good_step):  # The good checkpoints are kept, byte for byte.
    prefix = f'checkpoints{os.sep}{older}{os.sep}'
    kept = {k: v for k, v in before.items() if k.startswith(prefix)}
    assert kept and all(after.get(k) == v for k, v in kept.items()), f'checkpoint {older} changed'
  aside = os.listdir(os.path.join(workdir, 'checkpoints_unreadable'))  # The bad one: moved, never deleted.
  assert len(aside) == 1 and aside[0].startswith(f'{bad_step}-'), aside
  moved = {k.split(os.sep, 2)[2]: v for k, v in after.items() if k.startswith('checkpoints_unreadable')}
  assert moved == {k.split(os.sep, 2)[2]: v for k, v in before.items()
                   if k.startswith(f'checkpoints{os.sep}{bad_step}{os.sep}')}
  return workdir


@_case('latest_corrupt')
def test_latest_checkpoint_corrupt(runs, case):
  workdir = _assert_resumed(runs.result(case), good_step=4, bad_step=8)
  assert load_checkpoint(workdir, 8)  # Step 8 trained again from 4 and saved readable.


@_case('latest_half_written')
def test_latest_checkpoint_half_written(runs, case):
  _assert_resumed(runs.result(case), good_step=8, bad_step=12)

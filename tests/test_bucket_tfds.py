"""A TFDS dataset prepared as TFRecord (TFDS' default) in a bucket, through train.py against a real
fake-gcs-server behind a request-counting proxy: the same batches and eval counts as the same files on a local
disk, the index built from a few large ranged reads (not a request per record) and cached, one ranged read per
example."""

import os

import pytest
import tensorflow_datasets as tfds

import storage
from tests import harness, storage_servers
from tests.conftest import make_fake_mnist
from tests.storage_proxy import FaultProxy

pytestmark = pytest.mark.slow
NAME = 'dptrain_bucket_digits'
_ARRAYS = {}  # split -> (images, labels), what the builder below prepares from


class DptrainBucketDigits(tfds.core.GeneratorBasedBuilder):
  """make_fake_mnist's 10 classes as 28x28 PNGs."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(28, 28, 1)), 'label': tfds.features.ClassLabel(num_classes=10)}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in ('train', 'test')}

  def _generate_examples(self, split):
    images, labels = _ARRAYS[split]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield i, {'image': image[..., None], 'label': int(label)}


_PREPARED = {}


def _prepare(root_factory, file_format):
  """The dataset prepared on a local disk in `file_format`, once per module."""
  if file_format not in _PREPARED:
    from input_pipeline import idx
    if not _ARRAYS:
      raw = make_fake_mnist(str(root_factory.mktemp('raw')), num_train=256, num_test=48)
      for split in ('train', 'test'):
        _ARRAYS[split] = tuple(idx.read_idx(os.path.join(raw, f'{stem}.gz')) for stem in idx.SPLIT_FILES[split])
    root = str(root_factory.mktemp(file_format))
    b = DptrainBucketDigits(data_dir=root, file_format=file_format)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=2))
    assert b.info.splits['train'].num_shards == 2
    _PREPARED[file_format] = root
  return _PREPARED[file_format]


@pytest.fixture(scope='module')
def counted():
  """A fake-gcs-server of its own behind a proxy that counts requests."""
  port = harness.free_port()
  server = storage_servers.start_gcs(external_url=f'http://127.0.0.1:{port}')
  proxy = FaultProxy(server.url, port)
  yield server, proxy
  proxy.stop()
  server.stop()


def _fields(workdir):
  keep = ('kind', 'step', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'test_examples')
  return [{k: e[k] for k in keep if k in e} for e in harness.metrics(workdir) if e.get('kind') in ('train', 'eval')]


@pytest.mark.parametrize('file_format', ['tfrecord', 'array_record'])
def test_train_py_on_a_bucket_dataset_runs_the_local_batches(counted, tmp_path_factory, monkeypatch, tmp_path,
                                                             file_format):
  server, proxy = counted
  prepared = _prepare(tmp_path_factory, file_format)
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
  monkeypatch.setenv('DPTRAIN_CACHE_DIR', str(tmp_path / 'cache'))
  url = f'gs://{server.new_bucket()}/tfds'
  storage.upload_tree(prepared, url)
  steps, batch, eval_examples = 8, 64, 48
  args = ('--num_cpu_devices=2', '--config.data_source=tfds', f'--config.dataset={NAME}',
          f'--config.num_train_steps={steps}', '--config.eval_every_steps=4', '--config.log_every_steps=1')
  runs = {}
  requests = []
  for name, data in (('local', prepared), ('bucket', url), ('bucket_again', url)):
    runs[name] = str(tmp_path / name)
    before = proxy.requests
    proc = harness.run_train(runs[name], f'--config.data_dir={data}', *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    requests.append(proxy.requests - before)
  assert requests[0] == 0  # The local run never touched the bucket.
  want = _fields(runs['local'])
  assert [e for e in want if e['kind'] == 'eval'] and [e for e in want if e['kind'] == 'train']
  assert all(e['test_examples'] == eval_examples for e in want if e['kind'] == 'eval')
  assert _fields(runs['bucket']) == want and _fields(runs['bucket_again']) == want
  # Examples read: each train step's batch, two full evals (the start also reads a few to check the data).
  examples = steps * batch + 2 * eval_examples
  first, again = requests[1], requests[2]
  print(f'{file_format}: requests: first run {first}, again (cached) {again}; examples read {examples}')
  if file_format == 'tfrecord':  # One ranged GET per example, and a few more (metadata, listings, the index).
    assert examples <= first <= examples * 1.1 + 80, (first, examples)
  else:  # The shards are copied once (a few requests), then read locally.
    assert first <= 60, first
  assert again < first, (again, first)  # The index, or the copied shards, come from the cache.

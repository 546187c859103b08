"""IDX files in a bucket (`data_dir=gs://…` / `s3://…`) against real storage servers: the same arrays as the
same files on a local disk, a few requests per dataset (none per example), one line for a missing bucket or
prefix, and train.py on the bucket's copy runs the local copy's batches."""

import ml_collections
import numpy as np
import pytest

import storage
from errors import UserError
from input_pipeline import sources
from tests import harness, storage_servers
from tests.conftest import make_fake_mnist
from tests.storage_proxy import FaultProxy


@pytest.fixture(scope='module')
def local(tmp_path_factory):
  return make_fake_mnist(str(tmp_path_factory.mktemp('idx')), num_train=256, num_test=48)


@pytest.fixture(scope='module')
def counted(local):
  """A fake-gcs-server of its own behind a proxy that counts requests, with the dataset uploaded."""
  port = harness.free_port()
  server = storage_servers.start_gcs(external_url=f'http://127.0.0.1:{port}')
  proxy = FaultProxy(server.url, port)
  url = f'gs://{server.new_bucket()}/mnist'
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('STORAGE_EMULATOR_HOST', proxy.url)
    storage.upload_tree(local, url)
    yield url, proxy
  proxy.stop()
  server.stop()


def _config(data_dir, data_source='idx'):
  return ml_collections.ConfigDict(dict(dataset='fashion_mnist', data_source=data_source, data_dir=data_dir,
                                        download=False))


def _same(a, b):
  for name in ('train_images', 'train_labels', 'test_images', 'test_labels'):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert a.num_classes == b.num_classes and a.content_digest() == b.content_digest()


@pytest.mark.parametrize('data_source', ['idx', 'auto'])
def test_a_gcs_copy_loads_the_local_arrays_in_a_few_requests(counted, local, monkeypatch, data_source):
  url, proxy = counted
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
  before = proxy.requests
  remote = sources.load(_config(url, data_source))
  requests = proxy.requests - before
  _same(sources.load(_config(local, data_source)), remote)
  assert remote.description.startswith(f'idx:{url}')
  # A listing per split, one read per file, a directory check (and auto's listing): never one per example.
  assert requests <= 9, requests


def test_an_s3_copy_loads_the_local_arrays(s3_bucket, local):
  url = f'{s3_bucket}/data/mnist'
  storage.upload_tree(local, url)
  _same(sources.load(_config(local)), sources.load(_config(url)))


def test_a_missing_prefix_or_bucket_is_one_line(gcs_bucket, s3_bucket, local):
  for url in (f'{gcs_bucket}/nothing/here', 'gs://no-such-bucket-dptrain/mnist', f'{s3_bucket}/nothing',
              's3://no-such-bucket-dptrain/mnist'):
    with pytest.raises(UserError) as e:
      sources.load(_config(url))
    assert url in str(e.value) and '\n' not in str(e.value), str(e.value)
  half = f'{gcs_bucket}/half'  # The training files alone: the eval files are named as missing.
  for name in ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'):
    storage.upload(f'{local}/{name}', f'{half}/{name}')
  with pytest.raises(UserError, match=r't10k-images-idx3-ubyte\(\.gz\) is missing from gs://'):
    sources.load(_config(half))


@pytest.mark.slow
def test_train_py_on_the_bucket_runs_the_local_batches(counted, local, monkeypatch, tmp_path):
  url, proxy = counted
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
  args = ('--num_cpu_devices=2', '--config.num_train_steps=8', '--config.eval_every_steps=4',
          '--config.log_every_steps=1')
  runs = {}
  for name, data in (('local', local), ('bucket', url)):
    runs[name] = str(tmp_path / name)
    proc = harness.run_train(runs[name], f'--config.data_dir={data}', *args)
    assert proc.returncode == 0, proc.stderr[-3000:]

  def fields(workdir):
    keep = ('kind', 'step', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'test_examples')
    return [{k: e[k] for k in keep if k in e} for e in harness.metrics(workdir) if e.get('kind') in ('train', 'eval')]

  local_events, bucket_events = fields(runs['local']), fields(runs['bucket'])
  assert [e for e in local_events if e['kind'] == 'eval'] and [e for e in local_events if e['kind'] == 'train']
  assert bucket_events == local_events

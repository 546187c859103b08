"""The folder source on a bucket (`data_dir=gs://…`, `s3://…`) against real storage servers: the same classes,
paths, labels, digest and bytes as the same folder on a local disk, the same training through train.py, one
`error:` line for a bad bucket URL, and a bound on the requests it makes per image."""

import os

import ml_collections
import numpy as np
import pytest

import storage
from errors import UserError
from input_pipeline import folder
from tests import harness, storage_servers
from tests.image_folders import make_image_folder, write_image
from tests.storage_proxy import FaultProxy


def _config(data_dir, eval_split=''):
  return ml_collections.ConfigDict(dict(data_dir=data_dir, eval_split=eval_split))


def _nested_folder(root):
  """3 classes x (train 4, test 2), with sub-folders, a capitalised extension and dot-entries to skip."""
  make_image_folder(root, num_classes=3, per_class=(4, 2), size=(12, 12))
  cls, image = os.path.join(root, 'train', 'class_01'), np.full((12, 12, 3), 7, np.uint8)
  for sub in ('b/deeper', 'a', '.cache'):
    os.makedirs(os.path.join(cls, sub))
  for name in ('b/deeper/z.png', 'b/x.jpg', 'a/y.PNG', '.cache/thumb.jpg'):
    write_image(os.path.join(cls, name), image)
  open(os.path.join(cls, 'a', '.DS_Store'), 'w').write('finder')
  return root


@pytest.fixture(scope='module')
def local_folder(tmp_path_factory):
  return _nested_folder(str(tmp_path_factory.mktemp('imgs') / 'imgs'))


def _relative(src, split):
  top = src._split_dirs[split]
  return [p[len(top):].lstrip('/' + os.sep) for p in src._files[split][0]]


@pytest.mark.parametrize('bucket_fixture', ['gcs_bucket', 's3_bucket'])
def test_a_bucket_folder_is_the_local_folder(request, bucket_fixture, local_folder):
  url = storage.join(request.getfixturevalue(bucket_fixture), 'data', 'imgs')
  storage.upload_tree(local_folder, url)
  local, remote = folder.load(_config(local_folder)), folder.load(_config(url))
  assert remote.classes == local.classes == ['class_00', 'class_01', 'class_02']
  for split in ('train', 'eval'):
    assert _relative(remote, split) == _relative(local, split)
    np.testing.assert_array_equal(remote.labels(split), local.labels(split))
  assert 'class_01/b/deeper/z.png' in _relative(remote, 'train') and remote.num_examples('train') == 15
  assert remote.content_digest() == local.content_digest() and remote.identity() == local.identity()
  assert (remote.channels, remote.image_shape) == (local.channels, local.image_shape) == (3, (12, 12, 3))
  for split, indices in (('train', (0, 5, 9, 14)), ('eval', (0, 5))):
    r, loc = remote.reader(split), local.reader(split)
    for i in indices:
      (rb, rl), (lb, ll) = r(np.int64(i)), loc(np.int64(i))
      assert rb.numpy() == lb.numpy() and len(rb.numpy()) > 50 and int(rl) == int(ll)
  assert remote.name_of('eval', 5) == storage.join(url, 'test', 'class_02', '00001.png')


def _error(fn, *fragments):
  with pytest.raises(UserError) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg, msg
  for f in fragments:
    assert f in msg, msg
  return msg


def test_bad_bucket_urls_are_one_line(gcs_bucket, local_folder):
  from input_pipeline import sources
  storage.upload_tree(local_folder, storage.join(gcs_bucket, 'imgs'))
  config = lambda d: ml_collections.ConfigDict(dict(data_source='folder', data_dir=d, eval_split=''))  # noqa: E731
  _error(lambda: sources.load(config('gs://no-such-bucket-4711/imgs')), 'no-such-bucket-4711', 'does not exist')
  _error(lambda: sources.load(config(f'{gcs_bucket}/nothing/here')), f'{gcs_bucket}/nothing/here', 'does not exist')
  _error(lambda: sources.load(config(f'{gcs_bucket}/imgs/test')), 'no train/')
  _error(lambda: sources.load(config(f'{gcs_bucket}/imgs/train')), 'no train/')
  storage.write_bytes(f'{gcs_bucket}/imgs/train/class_00/notes.txt', b'hello')
  _error(lambda: sources.load(config(f'{gcs_bucket}/imgs')), f'{gcs_bucket}/imgs/train/class_00/notes.txt', 'JPEG')


@pytest.fixture(scope='module')
def proxied():
  """A fake-gcs-server of its own behind a request-counting proxy."""
  port = harness.free_port()
  server = storage_servers.start_gcs(external_url=f'http://127.0.0.1:{port}')
  proxy = FaultProxy(server.url, port)
  yield server, proxy
  proxy.stop()
  server.stop()


def test_requests_per_image(proxied, monkeypatch, tmp_path):
  """Listing is one request whatever the folder depth; a sniff and a training read are one request per image:
  a regression to a stat or a listing per file or folder fails here."""
  server, proxy = proxied
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
  monkeypatch.setenv('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  root = _nested_folder(str(tmp_path / 'imgs'))  # 2 splits x 3 classes, 15 + 6 images, sub-folders.
  url = f'gs://{server.new_bucket()}/imgs'
  storage.upload_tree(root, url)
  n = proxy.requests
  tree = storage.walk_files(url)
  listing = proxy.requests - n
  assert len(tree) == 23 and listing <= 2, listing  # 21 images + 2 dotfiles; 1 request (+1 for an auth/retry)
  n = proxy.requests
  src = folder.load(_config(url))
  build = proxy.requests - n
  images = src.num_examples('train') + src.num_examples('eval')
  assert images == 21 and build <= images + 3, build  # the listing + one ranged header read per image
  from input_pipeline.tf_host import tf
  read = src.reader('train')
  ds = tf.data.Dataset.range(src.num_examples('train')).map(read, num_parallel_calls=8)
  n = proxy.requests
  got = [b for b, _ in ds.as_numpy_iterator()]
  epoch = proxy.requests - n
  assert len(got) == 15 and epoch <= 15 + 2, epoch
  print(f'requests: listing {listing}, source build {build} for {images} images, one train epoch {epoch} for 15')


@pytest.mark.slow
def test_train_py_on_a_bucket_folder_trains_as_on_local_disk(gcs_bucket, tmp_path):
  root = make_image_folder(str(tmp_path / 'imgs'), num_classes=3, per_class=(16, 6), size=(12, 12), fmt='jpg')
  url = storage.join(gcs_bucket, 'imgs')
  storage.upload_tree(root, url)
  args = ['--config.data_source=folder', '--config.batch_size=8', '--config.eval_batch_size=8',
          '--config.num_train_steps=8', '--config.eval_every_steps=4', '--config.log_every_steps=1',
          '--config.augment=cifar', '--num_cpu_devices=2']
  runs = {}
  for name, data_dir in (('local', root), ('bucket', url)):
    workdir = str(tmp_path / name)
    r = harness.run_train(workdir, *args, f'--config.data_dir={data_dir}')
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    runs[name] = harness.metrics(workdir)
  keep = ('kind', 'step', 'epoch', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'test_examples')
  fields = lambda events: [{k: e[k] for k in keep if k in e} for e in events if e['kind'] in ('train', 'eval')]  # noqa: E731
  local, bucket = fields(runs['local']), fields(runs['bucket'])
  assert len(local) == 10 and [e['step'] for e in local] == [e['step'] for e in bucket]
  for a, b in zip(local, bucket, strict=True):
    assert a.keys() == b.keys(), (a, b)
    for k in a:
      if isinstance(a[k], float):
        assert abs(a[k] - b[k]) <= 1e-6, (k, a, b)
      else:
        assert a[k] == b[k], (k, a, b)
  evals = [e for e in bucket if e['kind'] == 'eval']
  assert evals and all(e['test_examples'] == 18 for e in evals)
  r = harness.run_train(str(tmp_path / 'bad'), *args, f'--config.data_dir={gcs_bucket}/no/such/prefix')
  lines = [x for x in r.stderr.splitlines() if x.startswith('error:')]
  assert r.returncode != 0 and len(lines) == 1 and 'no/such/prefix' in lines[0] and 'Traceback' not in r.stderr, \
    r.stderr[-3000:]


@pytest.mark.slow
def test_read_ahead_gives_the_local_batches_through_faults(proxied, monkeypatch, tmp_path):
  """The train and eval streams of a bucket folder (read ahead, one request per image) equal the local folder's,
  pixel for pixel, with one request in four answered 503 or 429 or dropped (retried with back-off)."""
  from benchmarks import kit
  from input_pipeline import augment, pipeline
  server, proxy = proxied
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
  monkeypatch.setenv('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  root = make_image_folder(str(tmp_path / 'imgs'), num_classes=3, per_class=(12, 5), size=(12, 12), fmt='jpg')
  url = f'gs://{server.new_bucket()}/imgs'
  storage.upload_tree(root, url)

  def streams(data_dir):
    config = kit.config(data_source='folder', data_dir=data_dir, augment='cifar', image_size=12)
    src = folder.load(config)
    prep = augment.Preprocess.from_config(config, src)
    train = pipeline.train_dataset(src, prep, seed=3, global_batch=8, rows=(2, 6), start_step=1, num_steps=9)
    evals = pipeline.eval_dataset(src, prep, eval_batch=8, rows=(0, 8))
    return src, [list(pipeline.as_numpy(ds)) for ds in (train, evals)]

  local_src, local = streams(root)
  bucket_src, _ = streams(url)
  assert bucket_src.remote and not local_src.remote
  proxy.every(4)
  faults = proxy.faults
  try:
    _, bucket = streams(url)
  finally:
    proxy.every(0)
  assert proxy.faults - faults >= 10
  for want, got in zip(local, bucket, strict=True):
    assert len(want) == len(got) > 0
    for a, b in zip(want, got, strict=True):
      assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

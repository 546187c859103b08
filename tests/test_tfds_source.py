"""TFDS sources: mock data through the trainer on 8 devices, and real `download_and_prepare` on local files
(our own small builder) read back by random access from the TFRecord files it writes."""

import os
import subprocess

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from errors import UserError
from input_pipeline import augment, pipeline, sources, tfds_source
from tests.image_folders import write_image
from trainer import loop

_IMAGES_DIR = {}  # where the test wrote the raw files that the builder below prepares from


class DptrainTinyImages(tfds.core.GeneratorBasedBuilder):
  """A 3-class PNG dataset prepared from files on disk: train, test (unlabelled, -1) and validation."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(6, 5, 3)), 'label': tfds.features.ClassLabel(num_classes=3)}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files: nothing to download.
    return {s: self._generate_examples(s) for s in ('train', 'test', 'validation')}

  def _generate_examples(self, split):
    d = os.path.join(_IMAGES_DIR['root'], split)
    for name in sorted(os.listdir(d)):
      label = -1 if split == 'test' else int(name.split('_')[0])
      yield name, {'image': os.path.join(d, name), 'label': label}


def _config(**kw):
  c = dict(dataset='dptrain_tiny_images', data_source='tfds', data_dir='', download=True, eval_split='')
  c.update(kw)
  return ml_collections.ConfigDict(c)


def _write_raw(root, counts=(('train', 13), ('test', 4), ('validation', 5))):
  rng = np.random.default_rng(0)
  images = {}
  for split, n in counts:
    os.makedirs(os.path.join(root, split))
    for i in range(n):
      image = rng.integers(0, 256, (6, 5, 3)).astype(np.uint8)
      name = f'{i % 3}_{i:03d}.png'
      write_image(os.path.join(root, split, name), image)
      images.setdefault(split, []).append((i % 3, image))
  return images


def test_real_download_and_prepare_then_random_access(tmp_path):
  _IMAGES_DIR['root'] = str(tmp_path / 'raw')
  written = _write_raw(_IMAGES_DIR['root'])
  src = sources.load(_config(data_dir=str(tmp_path / 'tfds')))  # Runs the real preparation code path.
  assert os.path.isfile(os.path.join(tfds_source.builder('dptrain_tiny_images', str(tmp_path / 'tfds')).data_dir,
                                     'dataset_info.json'))
  assert isinstance(src._records['train'], tfds_source.TFRecordIndex)
  assert src.num_classes == 3 and src.image_shape == (6, 5, 3) and src.channels == 3
  assert src.num_examples('train') == 13 and src.num_examples('eval') == 5
  assert src.eval_split == 'validation'  # test has no labels (-1), as in imagenet2012
  # Every record read by index holds one of the written images with its label (TFDS shuffles on write).
  prep = augment.Preprocess('none', 0, channels=3, native_shape=src.image_shape)
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(src, prep, eval_batch=8, rows=(0, 8))))
  got = sorted((int(y), tuple((img * 255).round().astype(np.uint8).ravel()))
               for b in batches for img, y, m in zip(b['image'], b['label'], b['mask'], strict=True) if m)
  want = sorted((y, tuple(img.ravel())) for y, img in written['validation'])
  assert got == want
  assert src.name_of('train', 2).startswith('record 2 of the train split') and '.tfrecord' in src.name_of('train', 2)
  assert sources.load(_config(data_dir=str(tmp_path / 'tfds'), eval_split='test')).num_examples('eval') == 4
  _error = pytest.raises(UserError, match='eval_split')
  with _error:
    sources.load(_config(data_dir=str(tmp_path / 'tfds'), eval_split='no_such_split'))


def test_truncated_tfrecord(tmp_path):
  path = str(tmp_path / 'x.tfrecord')
  import tensorflow as tf
  with tf.io.TFRecordWriter(path) as w:
    for r in (b'abc', b'defgh'):
      w.write(r)
  index = tfds_source.TFRecordIndex([path])
  assert len(index) == 2 and index[0] == b'abc' and index[1] == b'defgh'
  os.truncate(path, os.path.getsize(path) - 3)
  with pytest.raises(UserError, match='x.tfrecord is truncated'):
    tfds_source.TFRecordIndex([path])


@pytest.mark.slow
@pytest.mark.parametrize('dataset, extra', [
    ('cifar10', dict(augment='cifar', normalize=True, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))),
    ('imagenet2012', dict(augment='imagenet', image_size=32)),
])
def test_mock_tfds_through_the_trainer_on_8_devices(tmp_path, dataset, extra):
  c = tiny.get_config()
  c.update(dataset=dataset, data_source='tfds', download=True, batch_size=16, eval_batch_size=24, num_epochs=1,
           log_every_steps=2, checkpoint_every_steps=100, **extra)
  with tfds.testing.mock_data(num_examples=50):
    result = loop.train_and_evaluate(c, str(tmp_path / 'w'))
  assert result['test_examples'] == 50 and result['step'] == 3  # 50 // 16 steps, every eval example once
  assert np.isfinite(result['test_loss'])


@pytest.mark.slow
def test_download_offline_fails_with_a_network_line(tmp_path):
  """The real download path (no mock): offline it must end in our network line, within seconds, never in
  `ModuleNotFoundError` (tensorflow-datasets 4.9.10 imports the undeclared `importlib_resources` there)."""
  from tests import harness
  env = dict(harness._env(), HTTPS_PROXY='http://127.0.0.1:9', HTTP_PROXY='http://127.0.0.1:9')  # Closed port.
  cmd = harness.train_cmd(str(tmp_path / 'w'), '--config.dataset=mnist', '--config.data_source=tfds',
                          '--config.download=True', f'--config.data_dir={tmp_path / "tfds"}')
  proc = subprocess.run(cmd, cwd=harness.ROOT, env=env, capture_output=True, text=True, timeout=180)
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
  assert errors[0].startswith("error: could not download TFDS dataset 'mnist'") and 'check the network' in errors[0]
  assert 'ModuleNotFoundError' not in proc.stderr and 'Traceback' not in proc.stderr

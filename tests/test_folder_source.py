"""The folder source: layout, labels, colour modes, sizes, every bad-data case, and train.py end to end."""

import os

import ml_collections
import numpy as np
import pytest

from configs import tiny
from errors import UserError
from input_pipeline import folder
from parallel import mesh as mesh_lib
from tests import harness
from tests.image_folders import make_image_folder, write_image
from trainer import job as job_lib


def _config(data_dir, eval_split=''):
  return ml_collections.ConfigDict(dict(data_dir=data_dir, eval_split=eval_split))


def _error(fn, *fragments):
  with pytest.raises(UserError) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg
  for f in fragments:
    assert str(f) in msg, msg
  return msg


def test_layout_labels_and_counts(tmp_path):
  root = make_image_folder(str(tmp_path / 'd'), num_classes=3, per_class=(5, 2), size=(6, 7))
  src = folder.load(_config(root))
  assert src.classes == ['class_00', 'class_01', 'class_02'] and src.num_classes == 3
  assert src.num_examples('train') == 15 and src.num_examples('eval') == 6
  assert src.image_shape == (6, 7, 3) and src.channels == 3
  labels = [src.reader('train')(i)[1].numpy() for i in range(15)]
  assert labels == [k for k in range(3) for _ in range(5)]
  assert src.name_of('eval', 5).endswith(os.path.join('test', 'class_02', '00001.png'))


def test_files_in_sub_folders_belong_to_their_class(tmp_path):
  """As Keras and torchvision read a class folder: at any depth, extensions in any case, dot-entries skipped,
  in one order (the folder's own files, then its sub-folders by name) that the content digest follows."""
  root = make_image_folder(str(tmp_path / 'd'), num_classes=2, per_class=(2, 1))
  cls, image = os.path.join(root, 'train', 'class_01'), np.zeros((12, 12, 3), np.uint8)
  for sub in ('b/deeper', 'a', '.cache'):
    os.makedirs(os.path.join(cls, sub))
  for name in ('b/deeper/z.png', 'b/x.jpg', 'a/y.PNG', '.cache/thumb.jpg'):
    write_image(os.path.join(cls, name), image)
  open(os.path.join(cls, 'a', '.DS_Store'), 'w').write('finder')
  src = folder.load(_config(root))
  train = [os.path.relpath(p, os.path.join(root, 'train')) for p in src._files['train'][0]]
  assert train == ['class_00/00000.png', 'class_00/00001.png', 'class_01/00000.png', 'class_01/00001.png',
                   'class_01/a/y.PNG', 'class_01/b/x.jpg', 'class_01/b/deeper/z.png'], train
  assert list(src.labels('train')) == [0, 0, 1, 1, 1, 1, 1] and src.classes == ['class_00', 'class_01']
  import shutil
  copy = shutil.copytree(root, str(tmp_path / 'elsewhere'))
  assert folder.load(_config(copy)).content_digest() == src.content_digest()
  write_image(os.path.join(copy, 'train', 'class_01', 'b', 'deeper', 'new.png'), image)
  assert folder.load(_config(copy)).content_digest() != src.content_digest()
  os.makedirs(os.path.join(root, 'train', 'class_00', 'empty'))  # An empty sub-folder is no error...
  assert folder.load(_config(root)).num_examples('train') == 7
  for f in os.listdir(os.path.join(root, 'test', 'class_01')):  # ...a class with sub-folders but no image is.
    os.remove(os.path.join(root, 'test', 'class_01', f))
  os.makedirs(os.path.join(root, 'test', 'class_01', 'sub'))
  _error(lambda: folder.load(_config(root)), os.path.join(root, 'test', 'class_01'), 'no images')


@pytest.mark.parametrize('eval_dir', ['validation', 'val'])
def test_eval_folder_names(tmp_path, eval_dir):
  root = make_image_folder(str(tmp_path / 'd'), per_class=(2, 1), eval_dir=eval_dir)
  assert folder.load(_config(root)).num_examples('eval') == 3
  os.rename(os.path.join(root, eval_dir), os.path.join(root, 'holdout'))
  assert folder.load(_config(root, 'holdout')).num_examples('eval') == 3
  _error(lambda: folder.load(_config(root)), 'test/', 'eval_split')


def test_grayscale_only_when_every_image_is(tmp_path):
  root = make_image_folder(str(tmp_path / 'd'), per_class=(2, 1), channels=1)
  assert folder.load(_config(root)).channels == 1
  write_image(os.path.join(root, 'test', 'class_00', 'rgb.png'), np.zeros((12, 12, 3), np.uint8))
  assert folder.load(_config(root)).channels == 3


def test_mixed_sizes(tmp_path):
  root = make_image_folder(str(tmp_path / 'd'), per_class=(4, 2), size=(12, 12))
  write_image(os.path.join(root, 'train', 'class_01', 'big.jpg'), np.zeros((20, 16, 3), np.uint8))
  src = folder.load(_config(root))
  assert src.image_shape is None
  c = tiny.get_config()
  c.update(data_source='folder', data_dir=root, batch_size=8, eval_batch_size=8)
  _error(lambda: job_lib.build(c, mesh=mesh_lib.make_mesh(1), data=src), 'image_size')
  c.image_size = 10
  job = job_lib.build(c, mesh=mesh_lib.make_mesh(1), data=src)
  feed = job.eval_feed()
  try:
    assert sum(float(np.asarray(b['mask']).sum()) for b in feed) == 6
  finally:
    feed.close()


# --- bad data: one line naming the file -----------------------------------------------------------------------


def _empty_class(root):
  os.makedirs(os.path.join(root, 'train', 'class_99'))
  return os.path.join(root, 'train', 'class_99')


def _text_file(root):
  path = os.path.join(root, 'train', 'class_01', 'notes.txt')
  open(path, 'w').write('hello')
  return path


def _garbage_png(root):
  path = os.path.join(root, 'test', 'class_00', 'garbage.png')
  open(path, 'wb').write(b'this is not a png at all')
  return path


def _gif_named_png(root):
  from PIL import Image
  path = os.path.join(root, 'train', 'class_00', 'anim.png')
  Image.new('RGB', (12, 12)).save(path, format='GIF')
  return path


def _eval_only_class(root):
  path = os.path.join(root, 'test', 'class_77')
  os.makedirs(path)
  write_image(os.path.join(path, 'a.png'), np.zeros((12, 12, 3), np.uint8))
  return path


def _no_train(root):
  os.rename(os.path.join(root, 'train'), os.path.join(root, 'training'))
  return os.path.join(root)


def _empty_train(root):
  import shutil
  shutil.rmtree(os.path.join(root, 'train'))
  os.makedirs(os.path.join(root, 'train'))
  return os.path.join(root, 'train')


@pytest.mark.parametrize('damage', [_empty_class, _text_file, _garbage_png, _gif_named_png, _eval_only_class,
                                    _no_train, _empty_train])
def test_bad_data_at_start_up(tmp_path, damage):
  root = make_image_folder(str(tmp_path / 'd'), per_class=(2, 1))
  named = damage(root)
  _error(lambda: folder.load(_config(root)), named)


def test_missing_data_dir(tmp_path):
  _error(lambda: folder.load(_config(str(tmp_path / 'nope'))), 'nope', 'data_dir')
  _error(lambda: folder.load(_config('')), 'data_dir')


def _truncate_body(path):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:data.index(b'\xff\xda') + 20])  # Cut in the scan data: the header sniff passes.


@pytest.mark.parametrize('split', ['train', 'eval'])
def test_decode_failure_during_training_names_file_and_step(tmp_path, split):
  root = make_image_folder(str(tmp_path / 'd'), per_class=(8, 4), fmt='jpg')
  bad = os.path.join(root, 'train' if split == 'train' else 'test', 'class_01', '00002.jpg')
  _truncate_body(bad)
  src = folder.load(_config(root))
  c = tiny.get_config()
  c.update(data_source='folder', data_dir=root, batch_size=8, eval_batch_size=8, num_train_steps=6)
  job = job_lib.build(c, mesh=mesh_lib.make_mesh(2), data=src)
  feed = job.train_feed(0) if split == 'train' else job.eval_feed()
  try:
    with pytest.raises(UserError) as e:
      for _ in feed:
        pass
  finally:
    feed.close()
  msg = str(e.value)
  assert bad in msg and '\n' not in msg
  if split == 'train':  # The step that holds the file: its batch under the job's order.
    from input_pipeline import order
    i = src._files['train'][0].index(bad)
    step = next(s for s in range(6) if i in order.epoch_batches(c.seed, s // 3, 24, 8)[s % 3])
    assert f'at training step {step + 1}' in msg
  else:
    assert 'evaluation' in msg


# --- train.py end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_py_on_a_folder(tmp_path):
  root = make_image_folder(str(tmp_path / 'd'), num_classes=4, per_class=(48, 13), size=(16, 16), fmt='jpg')
  for split, k in (('train', 3), ('test', 1)):  # Files in sub-folders of a class folder are that class's.
    d = os.path.join(root, split, f'class_{k:02d}')
    os.makedirs(os.path.join(d, 'more'))
    for f in sorted(os.listdir(d))[::2]:
      if f != 'more':
        os.rename(os.path.join(d, f), os.path.join(d, 'more', f))
  args = ['--config.data_source=folder', f'--config.data_dir={root}', '--config.batch_size=32',
          '--config.eval_batch_size=16', '--config.num_epochs=3', '--config.augment=cifar', '--num_cpu_devices=2']
  r = harness.run_train(str(tmp_path / 'w'), *args)
  assert r.returncode == 0, r.stderr[-2000:]
  evals = [m for m in harness.metrics(str(tmp_path / 'w')) if m['kind'] == 'eval']
  assert [m['test_examples'] for m in evals] == [52] * 3
  assert evals[-1]['test_accuracy'] > 0.5  # 4 classes: chance is 0.25
  # A file that breaks during training: one error line naming it and the step, exit 2, checkpoints kept.
  _truncate_body(os.path.join(root, 'train', 'class_02', '00007.jpg'))
  r = harness.run_train(str(tmp_path / 'w2'), *args)
  lines = [x for x in r.stderr.splitlines() if x.startswith('error:')]
  assert r.returncode == 2 and len(lines) == 1 and '00007.jpg' in lines[0] and 'training step' in lines[0], r.stderr
  assert 'Traceback' not in r.stderr

"""IDX reader: round trips, and every kind of damaged or missing file becomes one UserError naming it."""

import gzip
import os

import ml_collections
import numpy as np
import pytest

from errors import UserError
from input_pipeline import idx, sources
from tests.conftest import make_fake_mnist

TRAIN_IMAGES, TRAIN_LABELS = idx.SPLIT_FILES['train']
TEST_IMAGES, TEST_LABELS = idx.SPLIT_FILES['test']


def _path(directory, stem, gz):
  return os.path.join(directory, stem + ('.gz' if gz else ''))


def _raw(path):
  """The decompressed bytes of an IDX file."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    return f.read()


def _write_raw(path, data: bytes):
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(data)


def _user_error(fn, *names):
  """Calls `fn`; it must raise exactly a UserError (no other type) whose message holds every one of `names`."""
  try:
    fn()
  except Exception as e:  # noqa: BLE001 -- the point is that nothing but UserError may escape.
    assert type(e) is UserError, f'{type(e).__name__} leaked instead of UserError: {e}'
    for name in names:
      assert name in str(e), f'message does not name {name!r}: {e}'
    return str(e)
  raise AssertionError('no error was raised')


def _config(data_dir, dataset='fashion_mnist', data_source='idx', download=False):
  return ml_collections.ConfigDict(dict(dataset=dataset, data_source=data_source, data_dir=data_dir,
                                        download=download))


@pytest.fixture(params=[True, False], ids=['gz', 'plain'])
def gz(request):
  return request.param


@pytest.fixture
def data_dir(tmp_path, gz):
  return make_fake_mnist(str(tmp_path / 'd'), num_train=24, num_test=10, gz=gz)


@pytest.fixture
def gz_dir(tmp_path):
  return make_fake_mnist(str(tmp_path / 'd'), num_train=24, num_test=10, gz=True)


# --- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('array', [
    np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5),
    np.array([0, 9, 255, 7], np.uint8),
    np.array([-3, 0, 70000, 2 ** 31 - 1], np.int32),
    np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3),
    np.zeros((0, 28, 28), np.uint8),
], ids=['u8_3d', 'u8_1d', 'i32_1d', 'u8_4d', 'empty'])
def test_write_read_round_trip(tmp_path, gz, array):
  path = _path(str(tmp_path), 'a', gz)
  idx.write_idx(path, array)
  if gz:
    with open(path, 'rb') as f:
      assert f.read(2) == b'\x1f\x8b'  # Really gzipped.
  out = idx.read_idx(path)
  assert out.shape == array.shape
  assert out.dtype.kind == array.dtype.kind and out.dtype.itemsize == array.dtype.itemsize
  np.testing.assert_array_equal(out, array)


def test_load_split_round_trip(data_dir, gz):
  images = idx.read_idx(idx.find_file(data_dir, TRAIN_IMAGES))
  labels = idx.read_idx(idx.find_file(data_dir, TRAIN_LABELS))
  assert idx.find_file(data_dir, TRAIN_IMAGES).endswith('.gz') == gz
  x, y = idx.load_split(data_dir, 'train', 10, (28, 28, 1))
  assert x.dtype == np.uint8 and x.shape == (24, 28, 28, 1)
  assert y.dtype == np.int32 and y.shape == (24,)
  np.testing.assert_array_equal(x[..., 0], images)
  np.testing.assert_array_equal(y, labels)


def test_sources_load_idx(data_dir):
  data = sources.load(_config(data_dir))
  assert data.train_images.shape == (24, 28, 28, 1) and data.test_images.shape == (10, 28, 28, 1)
  assert data.num_classes == 10 and data.image_shape == (28, 28, 1)
  assert data.source == f'idx:{data_dir}'
  np.testing.assert_array_equal(data.test_labels, idx.read_idx(idx.find_file(data_dir, TEST_LABELS)))
  # 'auto' finds the IDX files too.
  auto = sources.load(_config(data_dir, data_source='auto'))
  np.testing.assert_array_equal(auto.train_images, data.train_images)


def test_labels_up_to_num_classes_minus_one_are_accepted(data_dir, gz):
  path = _path(data_dir, TEST_LABELS, gz)
  idx.write_idx(path, np.array([0, 9] * 5, np.uint8))
  _, y = idx.load_split(data_dir, 'test', 10)
  assert y.min() == 0 and y.max() == 9


# --- corruption: every case is a UserError naming the file ------------------------------------------------------


@pytest.mark.parametrize('magic', [b'\x12\x34\x56\x78', b'\x00\x00\x07\x03', b'\x01\x00\x08\x03', b''],
                         ids=['garbage', 'unknown_dtype', 'nonzero_first_byte', 'empty'])
def test_bad_magic_number(data_dir, gz, magic):
  path = _path(data_dir, TRAIN_IMAGES, gz)
  data = _raw(path)
  _write_raw(path, magic + data[4:] if magic else b'')
  msg = _user_error(lambda: idx.read_idx(path), path)
  assert 'magic' in msg
  _user_error(lambda: idx.load_split(data_dir, 'train', 10), path)


@pytest.mark.parametrize('keep', [0.5, 0.95, 12, 3], ids=['half', 'most', 'header_only', 'tiny'])
def test_truncated_gzip(gz_dir, keep):
  data_dir = gz_dir
  path = _path(data_dir, TRAIN_IMAGES, True)
  with open(path, 'rb') as f:
    blob = f.read()
  cut = int(len(blob) * keep) if isinstance(keep, float) else keep
  with open(path, 'wb') as f:
    f.write(blob[:cut])
  _user_error(lambda: idx.read_idx(path), path)
  _user_error(lambda: idx.load_split(data_dir, 'train', 10), path)


@pytest.mark.parametrize('damage', ['crc', 'not_gzip'])
def test_corrupt_gzip(gz_dir, damage):
  path = _path(gz_dir, TRAIN_LABELS, True)
  with open(path, 'rb') as f:
    blob = bytearray(f.read())
  if damage == 'crc':
    blob[-6] ^= 0xFF  # Inside the CRC32 trailer.
  else:
    blob = bytearray(_raw(path))  # Plain IDX bytes under a .gz name.
  with open(path, 'wb') as f:
    f.write(bytes(blob))
  _user_error(lambda: idx.read_idx(path), path)


@pytest.mark.parametrize('change', [-1, -784, 1, 'header'], ids=['one_byte_short', 'one_image_short',
                                                                 'extra_byte', 'header'])
def test_truncated_payload(data_dir, gz, change):
  path = _path(data_dir, TRAIN_IMAGES, gz)
  data = _raw(path)
  if change == 'header':
    data = data[:10]  # Declares 3 dims but holds 1.5 of them.
  elif change < 0:
    data = data[:change]
  else:
    data = data + b'\x00' * change
  _write_raw(path, data)
  _user_error(lambda: idx.read_idx(path), path)
  _user_error(lambda: idx.load_split(data_dir, 'train', 10), path)


@pytest.mark.parametrize('num_labels', [23, 25])
def test_image_label_count_mismatch(data_dir, gz, num_labels):
  label_path = _path(data_dir, TRAIN_LABELS, gz)
  idx.write_idx(label_path, np.zeros(num_labels, np.uint8))
  msg = _user_error(lambda: idx.load_split(data_dir, 'train', 10), label_path, _path(data_dir, TRAIN_IMAGES, gz))
  assert '24' in msg and str(num_labels) in msg
  _user_error(lambda: sources.load(_config(data_dir)), label_path)


@pytest.mark.parametrize('labels', [[0, 10], [255, 1], [-1, 3]], ids=['num_classes', 'u8_max', 'negative'])
def test_labels_out_of_range(data_dir, gz, labels):
  path = _path(data_dir, TEST_LABELS, gz)
  dtype = np.int32 if min(labels) < 0 else np.uint8
  idx.write_idx(path, np.array(labels * 5, dtype))
  _user_error(lambda: idx.load_split(data_dir, 'test', 10), path)
  _user_error(lambda: sources.load(_config(data_dir)), path)


def test_labels_out_of_range_for_smaller_num_classes(data_dir, gz):
  # The fake labels go up to 9: with 5 classes they are out of range.
  _user_error(lambda: idx.load_split(data_dir, 'train', 5), _path(data_dir, TRAIN_LABELS, gz))


@pytest.mark.parametrize('shape', [(10, 27, 28), (10, 28, 28, 3), (10, 32, 32)])
def test_wrong_image_size(data_dir, gz, shape):
  path = _path(data_dir, TEST_IMAGES, gz)
  idx.write_idx(path, np.zeros(shape, np.uint8))
  _user_error(lambda: idx.load_split(data_dir, 'test', 10, (28, 28, 1)), path)
  # Through the loader: the test split must match the train split's shape.
  _user_error(lambda: sources.load(_config(data_dir)), path)


def test_wrong_image_size_for_dataset(tmp_path, gz):
  # Consistent 32x32 files are still not Fashion-MNIST.
  directory = str(tmp_path / 'big')
  os.makedirs(directory)
  for split, n in (('train', 4), ('test', 2)):
    idx.write_idx(_path(directory, idx.SPLIT_FILES[split][0], gz), np.zeros((n, 32, 32), np.uint8))
    idx.write_idx(_path(directory, idx.SPLIT_FILES[split][1], gz), np.zeros(n, np.uint8))
  _user_error(lambda: sources.load(_config(directory)), _path(directory, TRAIN_IMAGES, gz))


@pytest.mark.parametrize('which', ['images_are_labels', 'labels_are_images'])
def test_wrong_rank(data_dir, gz, which):
  image_path, label_path = _path(data_dir, TRAIN_IMAGES, gz), _path(data_dir, TRAIN_LABELS, gz)
  if which == 'images_are_labels':
    idx.write_idx(image_path, np.zeros(24, np.uint8))
    _user_error(lambda: idx.load_split(data_dir, 'train', 10), image_path)
  else:
    idx.write_idx(label_path, np.zeros((24, 28, 28), np.uint8))
    _user_error(lambda: idx.load_split(data_dir, 'train', 10), label_path)


@pytest.mark.parametrize('stem', [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS])
def test_missing_file(data_dir, gz, stem):
  os.remove(_path(data_dir, stem, gz))
  split = 'train' if stem.startswith('train') else 'test'
  _user_error(lambda: idx.load_split(data_dir, split, 10), stem, data_dir)
  _user_error(lambda: sources.load(_config(data_dir)), stem, data_dir)


def test_read_idx_missing_path(tmp_path):
  path = str(tmp_path / 'nope-idx1-ubyte')
  _user_error(lambda: idx.read_idx(path), path)


@pytest.mark.parametrize('data_source', ['idx', 'auto'])
def test_missing_directory(tmp_path, data_source):
  missing = str(tmp_path / 'no' / 'such' / 'dir')
  # `auto` falls back to TFDS, which is not prepared there either; both must say where they looked.
  _user_error(lambda: sources.load(_config(missing, data_source=data_source)), missing)
  assert not os.path.exists(missing)

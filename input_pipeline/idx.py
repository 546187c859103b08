"""Reader for IDX files (the MNIST / Fashion-MNIST format), gzipped or not, with validation.

Every way a file can be wrong (missing, truncated, bad magic, wrong shape, bad labels) becomes one
`UserError` naming the file, never a numpy reshape traceback.
"""

import gzip
import math
import os
import zlib

import numpy as np

import storage
from errors import UserError, setting

# IDX type codes -> numpy dtypes (big-endian on disk).
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
MAX_NDIM = 4  # Images [N, H, W(, C)] and labels [N]: a larger count is a damaged or foreign header.

SPLIT_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def find_file(directory: str, stem: str, names=None) -> str:
  """Returns `directory/stem.gz` or `directory/stem`, whichever exists. `names`: the directory's listing, if
  the caller has it (in a bucket, one listing instead of a request per candidate)."""
  for name in (stem + '.gz', stem):
    path = storage.join(directory, name)
    if (name in names) if names is not None else os.path.isfile(path):
      return path
  raise UserError(f'IDX file {stem}(.gz) is missing from {directory}: restore it (e.g. `apt-get install '
                  f'--reinstall dataset-fashion-mnist`) or point {setting("data_dir")} at a complete copy')


def _read_bytes(path: str) -> bytes:
  """The file's (decompressed) bytes. A bucket's file is fetched in one request (storage failures are already
  one line each)."""
  try:
    if storage.is_url(path):
      data = storage.read_bytes(path)
      return gzip.decompress(data) if path.endswith('.gz') else data
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        return f.read()
    with open(path, 'rb') as f:
      return f.read()
  except (EOFError, OSError, zlib.error) as e:
    raise UserError(f'{path} is truncated or corrupt ({e.__class__.__name__}: {e}): '
                    'download or reinstall the dataset') from None


def read_idx(path: str) -> np.ndarray:
  """Parses one IDX file into an array of its declared shape and dtype."""
  data = _read_bytes(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
    raise UserError(f'{path} is not an IDX file (bad magic number {data[:4].hex() or "<empty>"}): '
                    f'check that {setting("data_dir")} points at MNIST-format files')
  dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
  header = 4 + 4 * ndim
  if ndim > MAX_NDIM:
    raise UserError(f'{path} declares {ndim} dimensions (magic number {data[:4].hex()}); MNIST-format files have 1 '
                    f'to {MAX_NDIM}: the file is corrupt or not an IDX file, reinstall the dataset')
  if ndim == 0 or len(data) < header:
    raise UserError(f'{path} has a truncated IDX header: download or reinstall the dataset')
  shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
  expected = math.prod(shape) * dtype.itemsize  # Python ints: a corrupt header cannot overflow int64.
  if len(data) - header != expected:
    raise UserError(f'{path} holds {len(data) - header} bytes of data but its header declares shape '
                    f'{shape} ({expected} bytes): the file is truncated or corrupt, reinstall the dataset')
  return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_split(directory: str, split: str, num_classes: int, image_shape=None):
  """Loads one split as (images uint8 [N, H, W, C], labels int32 [N]), validated. `directory` may be a bucket
  URL: each file is then read whole, in one request (an IDX file has no per-example objects)."""
  names = set(storage.listdir(directory)) if storage.is_url(directory) else None
  image_path = find_file(directory, SPLIT_FILES[split][0], names)
  label_path = find_file(directory, SPLIT_FILES[split][1], names)
  images, labels = read_idx(image_path), read_idx(label_path)
  if images.ndim not in (3, 4):
    raise UserError(f'{image_path} holds an array of shape {images.shape}, expected images [N, H, W]')
  if labels.ndim != 1:
    raise UserError(f'{label_path} holds an array of shape {labels.shape}, expected labels [N]')
  if images.dtype.kind == 'f':
    raise UserError(f'{image_path} holds {images.dtype.name} pixels; images must be integers 0..255 (IDX type '
                    f'uint8): convert the file, or check {setting("data_dir")}')
  if images.dtype != np.uint8 and images.size and (images.min() < 0 or images.max() > 255):
    raise UserError(f'{image_path} holds pixel values in [{images.min()}, {images.max()}], outside 0..255: '
                    f'convert the file to uint8, or check {setting("data_dir")}')
  if images.ndim == 3:
    images = images[..., None]
  if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
    raise UserError(f'{image_path} holds images of shape {images.shape[1:]}, but this dataset expects '
                    f'{tuple(image_shape)}: check {setting("dataset")} and {setting("data_dir")}')
  if len(images) != len(labels):
    raise UserError(f'{image_path} has {len(images)} images but {label_path} has {len(labels)} labels: '
                    'the files belong to different datasets or one is damaged')
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise UserError(f'{label_path} has labels in [{labels.min()}, {labels.max()}], outside [0, {num_classes}): '
                    f'the file is corrupt or belongs to another dataset: check {setting("dataset")} and '
                    f'{setting("data_dir")}')
  return np.ascontiguousarray(images, dtype=np.uint8), labels.astype(np.int32)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes `array` (uint8 or int32) as an IDX file, gzipped if `path` ends in .gz (tests, tooling)."""
  code = 0x08 if array.dtype == np.uint8 else 0x0C
  payload = bytes([0, 0, code, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
  payload += np.ascontiguousarray(array, dtype=np.uint8 if code == 0x08 else '>i4').tobytes()
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(payload)

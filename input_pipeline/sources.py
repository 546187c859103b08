"""Dataset registry and loaders: every dataset arrives in memory as uint8 images + int32 labels.

`config.data_source`:
  - `idx`:  MNIST-format IDX files in `config.data_dir` (default: the dataset's Debian package directory).
  - `tfds`: a TFDS dataset by name, from `config.data_dir` (TFDS' default when empty); downloads only if
            `config.download` is true.
  - `auto`: IDX files if present, else a prepared TFDS dataset, else a download if allowed.
"""

import dataclasses
import os
from typing import Optional, Tuple

import numpy as np

from errors import UserError
from input_pipeline import idx


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What we know about a dataset before loading it."""
  num_classes: int
  image_shape: Tuple[int, int, int]
  idx_dir: Optional[str] = None       # where a system package puts its IDX files
  apt_package: Optional[str] = None   # the Debian/Ubuntu package that provides them


DATASETS = {
    'fashion_mnist': DatasetSpec(10, (28, 28, 1), '/usr/share/datasets/fashion-mnist', 'dataset-fashion-mnist'),
    'mnist': DatasetSpec(10, (28, 28, 1)),
    'cifar10': DatasetSpec(10, (32, 32, 3)),
}
SOURCES = ('auto', 'idx', 'tfds')
_TFDS_CHUNK = 8192  # examples per chunk when reading a TFDS split into memory


@dataclasses.dataclass
class InMemoryDataset:
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  source: str               # human-readable: where the data came from

  @property
  def image_shape(self):
    return tuple(self.train_images.shape[1:])


def _idx_dir(name: str, data_dir: str) -> Optional[str]:
  return data_dir or (DATASETS[name].idx_dir if name in DATASETS else None)


def _has_idx_files(directory: Optional[str]) -> bool:
  if not directory or not os.path.isdir(directory):
    return False
  return any(f.startswith('train-images-idx3-ubyte') for f in os.listdir(directory))


def _how_to_get(name: str) -> str:
  spec = DATASETS.get(name)
  if spec and spec.apt_package:
    return (f'install it with `apt-get install -y {spec.apt_package}`, or prepare it with TFDS on a machine '
            'with internet (`--config.data_source=tfds --config.download=True`)')
  return ('prepare it with TFDS on a machine with internet (`--config.download=True`, optionally '
          '`--config.data_dir=DIR`) or point --config.data_dir at its IDX files')


def load_idx(name: str, data_dir: str, num_classes: Optional[int] = None) -> InMemoryDataset:
  directory = _idx_dir(name, data_dir)
  if directory is None:
    raise UserError(f'dataset {name!r} has no default IDX directory: set --config.data_dir to a directory of '
                    f'IDX files, or use --config.data_source=tfds')
  if not os.path.isdir(directory):
    raise UserError(f'data directory {directory} does not exist: {_how_to_get(name)}')
  spec = DATASETS.get(name)
  num_classes = num_classes or (spec.num_classes if spec else 10)
  shape = spec.image_shape if spec else None
  train = idx.load_split(directory, 'train', num_classes, shape)
  test = idx.load_split(directory, 'test', num_classes, train[0].shape[1:])
  return InMemoryDataset(*train, *test, num_classes=num_classes, source=f'idx:{directory}')


def _tfds_builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds  # Imported lazily: slow, and only this path needs it.
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # TFDS raises several types for unknown names.
    if 'not found' in str(e).lower() or e.__class__.__name__ == 'DatasetNotFoundError':
      raise UserError(f'unknown dataset {name!r}: TFDS has no such dataset; set --config.dataset to one of '
                      f'{", ".join(sorted(DATASETS))} or a TFDS dataset name') from None
    raise


def _tfds_prepared(builder) -> bool:
  return os.path.isfile(os.path.join(builder.data_dir, 'dataset_info.json'))


def load_tfds(name: str, data_dir: str, download: bool) -> InMemoryDataset:
  import tensorflow_datasets as tfds
  builder = _tfds_builder(name, data_dir)
  if not _tfds_prepared(builder):
    if not download:
      raise UserError(f'TFDS dataset {name!r} is not prepared in {builder.data_dir} and downloads are off: '
                      f'{_how_to_get(name)}')
    try:
      builder.download_and_prepare()
    except Exception as e:
      raise UserError(f'could not download TFDS dataset {name!r} ({e.__class__.__name__}: {str(e)[:200]}): '
                      f'check the network, or {_how_to_get(name)}') from None
  arrays = {}
  for split in ('train', 'test'):
    # Fixed-size chunks, not `batch_size=-1`: that batches by the recorded split size and aborts the whole
    # process (std::length_error) when the builder records none (e.g. under `tfds.testing.mock_data`).
    chunks = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=_TFDS_CHUNK, as_supervised=True)))
    if not chunks:
      raise UserError(f'TFDS dataset {name!r} has an empty {split!r} split in {builder.data_dir}: prepare it '
                      f'again (`--config.download=True`) or {_how_to_get(name)}')
    images, labels = (np.concatenate(parts) for parts in zip(*chunks))
    if images.ndim == 3:
      images = images[..., None]
    arrays[split] = (np.ascontiguousarray(images, np.uint8), np.asarray(labels, np.int32))
  num_classes = builder.info.features['label'].num_classes
  return InMemoryDataset(*arrays['train'], *arrays['test'], num_classes=num_classes,
                         source=f'tfds:{builder.data_dir}')


def load(config) -> InMemoryDataset:
  """Loads `config.dataset` from `config.data_source` (see the module docstring)."""
  name, source, data_dir = config.dataset, config.data_source, config.data_dir
  if source not in SOURCES:
    raise UserError(f'unknown data_source {source!r}: set --config.data_source to one of {list(SOURCES)}')
  if data_dir and '://' not in data_dir and not os.path.isdir(data_dir) and not (config.download and source != 'idx'):
    raise UserError(f'--config.data_dir={data_dir} does not exist: point it at the directory of the IDX files '
                    '(or the TFDS data_dir), or leave it empty for the default location')
  if source == 'idx' or (source == 'auto' and _has_idx_files(_idx_dir(name, data_dir))):
    if name not in DATASETS and not data_dir:
      raise UserError(f'unknown dataset {name!r}: built-in datasets are {sorted(DATASETS)}; any TFDS name '
                      'works with --config.data_source=tfds')
    return load_idx(name, data_dir)
  if source == 'auto' and name in DATASETS and DATASETS[name].idx_dir and not data_dir and not config.download:
    builder = _tfds_builder(name, data_dir)
    if not _tfds_prepared(builder):
      raise UserError(f'dataset {name!r} was found neither as IDX files in {DATASETS[name].idx_dir} nor '
                      f'prepared for TFDS: {_how_to_get(name)}')
  return load_tfds(name, data_dir, config.download)

"""Data sources: which source a config names, and the source types everything else uses (from `base.py`).

A source (`base.Source`) knows its number of classes, its example counts per split ('train' and 'eval'), the
image shape it yields (None when sizes differ), its channel count, and how to read example `i` of a split as
a TF op: (uint8 [H, W, C] or encoded image bytes, int32 label). Nothing outside the source knows the file
format, and nothing is read whole: the pipeline asks each source only for this process's rows of every batch.

`SOURCES` is the registry `config.data_source` is checked against, `{name: builder(config) -> Source}`:
  - `idx`:    MNIST-format IDX files in `config.data_dir` (default: the dataset's Debian package directory),
              held in memory (they are small).
  - `tfds`:   a prepared TFDS dataset by name, read by random access from its files (`tfds_source.py`);
              downloads and prepares it first only if `config.download` is true.
  - `folder`: `config.data_dir/{train,test|validation|val}/<class>/*.{jpg,jpeg,png}` (`folder.py`).
  - `auto`:   IDX files if present, else a prepared TFDS dataset, else a download if allowed.
  - `synthetic`: examples generated on the devices with `config.dataset`'s shape and classes, no files and
              no TensorFlow (`synthetic.py`; for benchmarks and checks).
"""

import os

import paths
import storage
from errors import UserError, setting
from input_pipeline import idx
from input_pipeline.base import (
  DATASETS,
  SPLITS,
  DatasetSpec,
  InMemoryDataset,
  Source,
  check_classes,
  data_dir,
  digest_of,
  how_to_get,
)

__all__ = ['DATASETS', 'SPLITS', 'DatasetSpec', 'InMemoryDataset', 'Source', 'check_classes', 'data_dir',
           'digest_of', 'how_to_get', 'load', 'load_idx', 'SOURCES']


def _idx_dir(name: str, data_dir: str) -> str | None:
  return data_dir or (DATASETS[name].idx_dir if name in DATASETS else None)


def _has_idx_files(directory: str | None) -> bool:
  if not directory:
    return False
  return any(f.startswith('train-images-idx3-ubyte') for f in storage.listdir(directory))


def load_idx(name: str, data_dir: str, num_classes: int | None = None) -> InMemoryDataset:
  directory = _idx_dir(name, data_dir)
  if directory is None:
    raise UserError(f'dataset {name!r} has no default IDX directory: set {setting("data_dir")} to a directory of '
                    f'IDX files, or use {setting("data_source")}=tfds')
  if not storage.isdir(directory):
    raise UserError(f'data directory {directory} does not exist: {how_to_get(name)}')
  spec = DATASETS.get(name)
  num_classes = num_classes or (spec.num_classes if spec else 10)
  shape = spec.image_shape if spec else None
  train = idx.load_split(directory, 'train', num_classes, shape)
  test = idx.load_split(directory, 'test', num_classes, train[0].shape[1:])
  names = spec.class_names if spec and spec.class_names and len(spec.class_names) == num_classes else None
  return InMemoryDataset(*train, *test, num_classes=num_classes, source=f'idx:{directory}', names=names)


def _check_data_dir(config) -> None:
  local = data_dir(config)
  if local and not paths.is_url(local) and not os.path.isdir(local) and not config.download:
    raise UserError(f'{setting("data_dir")}={local} does not exist: point it at the directory of the IDX files '
                    '(or the TFDS data_dir), or leave it empty for the default location')


def _idx(config) -> Source:
  _check_data_dir(config)
  if config.dataset not in DATASETS and not config.data_dir:
    raise UserError(f'unknown dataset {config.dataset!r}: built-in datasets are {sorted(DATASETS)}; any TFDS name '
                    f'works with {setting("data_source")}=tfds')
  return load_idx(config.dataset, data_dir(config))


def _tfds(config) -> Source:
  from input_pipeline import tfds_source  # Imported lazily: TFDS is slow to import and only this path needs it.
  _check_data_dir(config)
  return tfds_source.load(config)


def _folder(config) -> Source:
  from input_pipeline import folder
  return folder.load(config)


def _auto(config) -> Source:
  name, directory = config.dataset, data_dir(config)
  _check_data_dir(config)
  if _has_idx_files(_idx_dir(name, directory)):
    return _idx(config)
  from input_pipeline import tfds_source
  if name in DATASETS and DATASETS[name].idx_dir and not directory and not config.download:
    if not tfds_source.is_prepared(tfds_source.builder(name, directory)):
      raise UserError(f'dataset {name!r} was found neither as IDX files in {DATASETS[name].idx_dir} nor '
                      f'prepared for TFDS: {how_to_get(name)}')
  return tfds_source.load(config)


def _synthetic(config) -> Source:
  from input_pipeline import synthetic  # JAX: loaded only for this source.
  return synthetic.load(config)


SOURCES = {'auto': _auto, 'idx': _idx, 'tfds': _tfds, 'folder': _folder, 'synthetic': _synthetic}


def load(config) -> Source:
  """The source of `config.dataset` from `config.data_source` (validated by `trainer.config_check`)."""
  return SOURCES[config.data_source](config)

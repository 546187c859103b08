"""TFDS datasets read by random access from their prepared files, never whole.

Every TFDS image-classification dataset becomes a `Source` whose example `i` is one serialized record,
parsed by TFDS's own feature spec inside the tf.data graph; the image stays encoded (JPEG/PNG bytes) until
the preprocessor decodes it (`augment.py`), so a JPEG crop can use the fused decode-and-crop.

Random access, so the same (seed, step, position) -> example guarantee holds as for folders and IDX:
  - ArrayRecord (`file_format=array_record`): `builder.as_data_source` (raw bytes), TFDS's own reader.
  - TFRecord (TFDS' default format, e.g. a `download_and_prepare` with default settings): an offset index,
    built at start-up by reading each record's 12-byte header (locally one pass of seeks over the files,
    about a second per 100k records; in a bucket `INDEX_BLOCK` ranged reads, cached); each example is then
    one `pread`, or one ranged GET in a bucket. The index holds 16 bytes per example (20 MB for ImageNet's
    1.28M), nothing else grows with the dataset.
Example counts come from the files (or the data source), never from `info.splits` alone: under
`tfds.testing.mock_data` that metadata is empty.
"""

import contextlib
import os
import struct
from collections.abc import Sequence

import numpy as np

import storage
from errors import UserError, first_line, setting
from input_pipeline import base, tf_host

tf = tf_host.module()  # Before TFDS: TensorFlow off the accelerators.

_EVAL_SPLITS = ('test', 'validation')  # In this order; a test split without labels (label -1) is skipped.


def builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # TFDS raises several types for unknown names.
    if 'not found' in str(e).lower() or e.__class__.__name__ == 'DatasetNotFoundError':
      raise UserError(f'unknown dataset {name!r}: TFDS has no such dataset; set {setting("dataset")} to one of '
                      f'{", ".join(sorted(base.DATASETS))} or a TFDS dataset name') from None
    if '://' in (data_dir or ''):  # A remote data_dir (gs://, s3://) that cannot be read: offline, no access.
      raise UserError(f'{setting("data_dir")}={data_dir} cannot be read ({first_line(e)}): check the network and '
                      'your credentials for that storage, or copy the dataset to a local directory') from None
    raise


def is_prepared(b) -> bool:
  return storage.isfile(storage.join(os.fspath(b.data_dir), 'dataset_info.json'))


INDEX_BLOCK = 16 << 20  # Bytes per ranged read while indexing a shard in a bucket.
INDEX_THREADS = 16  # Shards indexed at once (each shard's headers are a chain: the next depends on this length).


class TFRecordIndex:
  """Random access to the records of a list of (uncompressed) TFRecord files, in file order. Local files are
  indexed by seeking from header to header. A bucket's files are read in `INDEX_BLOCK` ranges (the headers
  parsed from memory: a request per header would be one round trip per record), several shards at once, and
  the index is kept in `storage.cache_dir` under the file's size and version, so a restart lists nothing new."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    if self.paths and storage.is_url(self.paths[0]):
      from concurrent.futures import ThreadPoolExecutor
      with ThreadPoolExecutor(min(INDEX_THREADS, len(self.paths))) as pool:
        parts = list(pool.map(_remote_index, self.paths))
    else:
      parts = [_local_index(p) for p in self.paths]
    parts = parts or [(np.zeros(0, np.int64), np.zeros(0, np.int64))]
    self._file = np.concatenate([np.full(len(o), f, np.int32) for f, (o, _) in enumerate(parts)])
    self._offset = np.concatenate([o for o, _ in parts])
    self._length = np.concatenate([n for _, n in parts])

  def __len__(self) -> int:
    return len(self._offset)

  def file_of(self, i: int) -> str:
    return self.paths[self._file[i]]

  def __getitem__(self, i: int) -> bytes:
    """One `pread` locally, one ranged GET in a bucket."""
    return storage.read_range(self.paths[self._file[i]], int(self._offset[i]), int(self._length[i]))

  def parts(self, indices) -> list[tuple[str, int, int]]:
    """(file, offset, length) of each record: what `storage.read_many` reads."""
    return [(self.paths[self._file[i]], int(self._offset[i]), int(self._length[i])) for i in indices]


def _truncated(path: str, pos: int, header: bool) -> UserError:
  what = 'a record header ends the file' if header else f'record at byte {pos} runs past the end of the file'
  return UserError(f'{path} is truncated ({what}): prepare the dataset again')


def _local_index(path: str):
  offsets, lengths = [], []
  size, pos = os.path.getsize(path), 0
  with open(path, 'rb') as fh:
    while pos < size:
      header = fh.read(12)
      if len(header) < 12:
        raise _truncated(path, pos, True)
      length = struct.unpack('<Q', header[:8])[0]
      if pos + 16 + length > size:
        raise _truncated(path, pos, False)
      offsets.append(pos + 12)
      lengths.append(length)
      pos += 16 + length
      fh.seek(pos)
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def _remote_index(path: str):
  size, version = storage.stat(path)
  cached = os.path.join(storage.cache_dir(path), f'tfrecord-index-{size}-{version}.npy'.replace('/', '_'))
  if os.path.isfile(cached):
    with contextlib.suppress(OSError, ValueError):
      both = np.load(cached)
      return both[0], both[1]
  offsets, lengths, pos = [], [], 0
  while pos < size:
    start = pos
    block = storage.read_range(path, start, min(INDEX_BLOCK, size - start))
    if len(block) < 12:  # The end of the file, or an object that shrank while read.
      raise _truncated(path, pos, True)
    while pos + 12 <= start + len(block):
      length = struct.unpack('<Q', block[pos - start: pos - start + 8])[0]
      if pos + 16 + length > size:
        raise _truncated(path, pos, False)
      offsets.append(pos + 12)
      lengths.append(length)
      pos += 16 + length
  both = np.asarray([offsets, lengths], np.int64).reshape(2, -1)
  tmp = f'{cached}.tmp{os.getpid()}.npy'
  with contextlib.suppress(OSError):  # A cache that cannot be written costs the next start a re-read, no more.
    np.save(tmp, both)
    os.replace(tmp, cached)
  return both[0], both[1]


def _records(b, split: str):
  """Indexable serialized records of `split`: the TFRecord index if those files exist, else a data source."""
  from tensorflow_datasets.core import file_adapters
  from tensorflow_datasets.core.decode import base as decode_base
  info = b.info
  if split in info.splits and info.file_format == file_adapters.FileFormat.TFRECORD:
    paths = [os.fspath(p) for p in info.splits[split].filepaths]
    if paths and storage.is_url(paths[0]):  # One listing, not a request per shard.
      names = set(storage.listdir(storage.dirname(paths[0])))
      present = all(p.rsplit('/', 1)[-1] in names for p in paths)
    else:
      present = all(os.path.isfile(p) for p in paths)
    if paths and present:
      return TFRecordIndex(paths)
  if (split in info.splits and info.file_format == file_adapters.FileFormat.ARRAY_RECORD
      and storage.is_url(os.fspath(b.data_dir))):
    return _cached_array_records([os.fspath(p) for p in info.splits[split].filepaths])
  try:
    return b.as_data_source(split, deserialize_method=decode_base.DeserializeMethod.RAW_BYTES)
  except Exception as e:  # Missing split, unsupported format: TFDS raises several types.
    raise UserError(f'cannot read the {split!r} split of TFDS dataset {b.name!r} in {b.data_dir} '
                    f'({e.__class__.__name__}: {first_line(e)[:200]}): prepare it again, or choose an existing '
                    f'split with {setting("eval_split")} (splits: {", ".join(info.splits) or "unknown"})') from None


def _cached_array_records(urls: Sequence[str]):
  """ArrayRecord's reader opens local files only: a bucket's shards are copied once into `storage.cache_dir`
  (named by size and version, so a rewritten shard is fetched again; the bucket stays the only source), then
  read by TFDS' own ArrayRecord data source. The cache needs the split's size in local disk."""
  from concurrent.futures import ThreadPoolExecutor

  from array_record.python.array_record_data_source import ArrayRecordDataSource

  def fetch(url):
    size, version = storage.stat(url)
    local = os.path.join(storage.cache_dir(storage.dirname(url)), f'{url.rsplit("/", 1)[-1]}-{size}-{version}')
    if not (os.path.isfile(local) and os.path.getsize(local) == size):
      try:
        storage.download(url, local)
      except OSError as e:
        raise UserError(f'cannot copy {url} into the local cache {os.path.dirname(local)} ({e.strerror or e}): '
                        'free disk space there, or set DPTRAIN_CACHE_DIR to a disk with room') from None
    return local
  with ThreadPoolExecutor(max(1, min(INDEX_THREADS, len(urls)))) as pool:
    return ArrayRecordDataSource(list(pool.map(fetch, urls)))


class TfdsSource(base.Source):
  """A prepared TFDS image-classification dataset; `image` and `label` keys from its supervised keys."""

  def __init__(self, b, eval_split: str = ''):
    import tensorflow_datasets as tfds
    info = b.info
    self._features = info.features
    self._image_key, self._label_key = info.supervised_keys or ('image', 'label')
    image, label = self._features[self._image_key], self._features[self._label_key]
    if not isinstance(image, tfds.features.Image) or not hasattr(label, 'num_classes'):
      raise UserError(f'TFDS dataset {b.name!r} is not an image-classification dataset (its supervised keys are '
                      f'{info.supervised_keys}): choose one whose examples are an image and a class label')
    self._decoders = {self._image_key: tfds.decode.SkipDecoding()}
    self.num_classes = label.num_classes
    self._names = tuple(label.names) if getattr(label, 'names', None) else None
    shape = tuple(image.shape)
    self.channels = shape[-1] or 3
    self.image_shape = shape if all(shape) else None
    self.description = f'tfds:{b.data_dir}'
    self._records = {'train': _records(b, 'train')}
    self.eval_split = eval_split or self._default_eval_split(b)
    self._records['eval'] = _records(b, self.eval_split)
    for split, records in self._records.items():
      if not len(records):
        raise UserError(f'TFDS dataset {b.name!r} has an empty {split} split in {b.data_dir}: prepare it again '
                        f'(`{setting("download")}=True`) or {base.how_to_get(b.name)}')

  def _default_eval_split(self, b) -> str:
    """`test`, or `validation` where the test split has no labels (imagenet2012) or does not exist."""
    names = list(b.info.splits)
    if not names:  # No split metadata (e.g. under tfds.testing.mock_data): TFDS' usual name.
      return 'test'
    for name in _EVAL_SPLITS:
      if name in names and (name != 'test' or 'validation' not in names or self._labelled(b, name)):
        return name
    raise UserError(f'TFDS dataset {b.name!r} has no test or validation split (it has {", ".join(names)}): '
                    f'choose one with {setting("eval_split")}')

  def _labelled(self, b, split) -> bool:
    first = self._features.deserialize_example(_records(b, split)[0], decoders=self._decoders)
    return int(first[self._label_key]) >= 0

  def num_examples(self, split: str) -> int:
    return len(self._records[split])

  @property
  def remote(self) -> bool:
    """TFRecord files in a bucket (ArrayRecord shards are read from their local copies)."""
    records = self._records['train']
    return isinstance(records, TFRecordIndex) and bool(records.paths) and storage.is_url(records.paths[0])

  def fetcher(self, split: str):
    records = self._records[split]
    if isinstance(records, TFRecordIndex):
      return lambda indices: storage.read_many(records.parts(indices))
    return lambda indices: [records[i] for i in indices]  # TFDS' data source (ArrayRecord): local reads.

  def parser(self, split: str):
    def parse(i, serialized):
      del i  # The record holds its label.
      example = self._features.deserialize_example(tf.ensure_shape(serialized, []), decoders=self._decoders)
      return example[self._image_key], tf.cast(example[self._label_key], tf.int32)
    return parse

  def reader(self, split: str):
    return base.fetched_reader(self, split)

  def class_names(self):
    return self._names or super().class_names()

  def content_digest(self) -> str:
    """The splits read and their record counts (TFDS' own metadata names the files)."""
    return base.digest_of([self.eval_split] + [str(len(self._records[s])) for s in base.SPLITS])

  def name_of(self, split: str, index: int) -> str:
    records = self._records[split]
    where = f' in {records.file_of(index)}' if isinstance(records, TFRecordIndex) else ''
    return f'record {index} of the {split} split ({self.eval_split if split == "eval" else "train"}){where}'


@contextlib.contextmanager
def _few_download_retries(retries: int = 3):
  """TFDS retries each URL 10 times with exponential back-off: offline, that is 3.5 minutes of silence before
  the error (measured). 3 retries still ride out a transient failure and fail offline within seconds."""
  from tensorflow_datasets.core.download import downloader
  saved = getattr(downloader, 'MAX_RETRIES', None)
  if saved is not None:
    downloader.MAX_RETRIES = min(saved, retries)
  try:
    yield
  finally:
    if saved is not None:
      downloader.MAX_RETRIES = saved


def load(config) -> TfdsSource:
  name = config.dataset
  b = builder(name, base.data_dir(config))
  if not is_prepared(b):
    if not config.download:
      raise UserError(f'TFDS dataset {name!r} is not prepared in {b.data_dir} and downloads are off: '
                      f'{base.how_to_get(name)}')
    try:
      with _few_download_retries():
        b.download_and_prepare()
    except Exception as e:
      raise UserError(f'could not download TFDS dataset {name!r} ({e.__class__.__name__}: {first_line(e)[:200]}): '
                      f'check the network, or {base.how_to_get(name)}') from None
  return TfdsSource(b, config.get('eval_split', ''))

"""The source contract: what a dataset holds and how to read one example of it by its global index.

A `Source` knows its number of classes, its example counts per split ('train' and 'eval'), the image shape it
yields (None when sizes differ), its channel count, its identity (counts, class names, a location-free
content digest), and how to read example `i` of a split as a TF op. The concrete sources (`folder.py`,
`tfds_source.py`, the in-memory IDX arrays here) build on it; `sources.py` picks one from the config.
"""

import dataclasses
import hashlib
import json
from collections.abc import Callable

import numpy as np

import paths
from errors import UserError, setting

SPLITS = ('train', 'eval')


class Source:
  """What the pipeline needs of a dataset; subclasses fill the attributes and implement the methods."""
  description: str                              # human-readable: where the data comes from
  num_classes: int
  image_shape: tuple[int, int, int] | None   # native shape, None when images differ in size
  channels: int

  def num_examples(self, split: str) -> int:
    raise NotImplementedError

  # Examples come over the network (a bucket): the pipeline reads them ahead on I/O threads of their own
  # (`read_ahead.py`) through `fetcher` and `parser`, which such a source implements; `reader` stays for the rest.
  remote = False

  def reader(self, split: str) -> Callable:
    """A TF function: int64 index -> (image uint8 [H, W, C] or encoded bytes, int32 label)."""
    raise NotImplementedError

  def fetcher(self, split: str) -> Callable[[list[int]], list[bytes]]:
    """A Python function, safe to call from several threads: indices -> their examples' encoded bytes (one
    request each, all in flight at once: `storage.read_many`)."""
    raise NotImplementedError

  def parser(self, split: str) -> Callable:
    """A TF function: (int64 index, string of `fetcher`'s bytes) -> what `reader` returns for that index."""
    raise NotImplementedError

  def name_of(self, split: str, index: int) -> str:
    """Where example `index` lives, for error messages (a file path, a record number)."""
    return f'example {index} of the {split} split of {self.description}'

  def class_names(self) -> tuple[str, ...]:
    """The label names, by label index; sources without names use '0'..'K-1'."""
    return tuple(str(k) for k in range(self.num_classes))

  def content_digest(self) -> str:
    """A digest of what the data holds, independent of where it sits: two copies of one dataset in different
    directories give the same digest, a copy with a file added or removed gives another. Subclasses say
    what they hash (file list with sizes, record counts, array bytes)."""
    return ''

  def identity(self) -> dict:
    """What makes two copies of the data the same data (hosts compare it; checkpoints record it): example
    counts per split, class names and the content digest. JSON-serializable; no path in it. Computed once per
    source (a folder's digest stats every file; the hosts' check and the checkpoint fingerprint both ask)."""
    if getattr(self, '_identity', None) is None:
      self._identity = {'examples': {s: int(self.num_examples(s)) for s in SPLITS},
                        'classes': list(self.class_names()), 'digest': self.content_digest()}
    return json.loads(json.dumps(self._identity))  # A copy: callers may edit theirs.


def fetched_reader(source: Source, split: str) -> Callable:
  """`reader` made of `fetcher` and `parser`: one example per call, fetched from a numpy_function. Its bytes
  travel as an object array: `np.bytes_` would drop trailing NUL bytes (a protobuf may end in one)."""
  from input_pipeline.tf_host import tf
  fetch, parse = source.fetcher(split), source.parser(split)

  def raw(j):
    return np.array(fetch([int(j)])[0], dtype=object)
  return lambda i: parse(i, tf.numpy_function(raw, [i], tf.string, stateful=False))


def check_classes(source: Source) -> None:
  """A classifier needs 2 classes: with one, the loss is 0 and the accuracy 1.0 from the first step, and
  nothing is learned. In-memory labels are counted (a 10-class IDX file may hold a single label)."""
  present = source.num_classes
  if isinstance(source, InMemoryDataset):
    present = min(present, len(np.unique(source.train_labels)))
  if present < 2:
    names = source.class_names()
    which = f' ({names[0]!r})' if present == 1 and len(names) == 1 else ''
    raise UserError(f'{source.description} has {present} class{"" if present == 1 else "es"}{which} in its train '
                    'split: a classifier needs at least 2; add the other classes\' examples (folder source: one '
                    f'sub-folder per class under train/), or check {setting("data_dir")}')


def digest_of(items) -> str:
  """SHA-256 (hex, first 16 bytes) of an iterable of str/bytes parts, each length-prefixed."""
  h = hashlib.sha256()
  for item in items:
    b = item.encode() if isinstance(item, str) else bytes(item)
    h.update(len(b).to_bytes(8, 'little'))
    h.update(b)
  return h.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What we know about a built-in dataset before loading it."""
  num_classes: int
  image_shape: tuple[int, int, int]
  idx_dir: str | None = None       # where a system package puts its IDX files
  apt_package: str | None = None   # the Debian/Ubuntu package that provides them
  class_names: tuple[str, ...] | None = None  # TFDS' label names, so IDX and TFDS copies agree


DATASETS = {
    'fashion_mnist': DatasetSpec(10, (28, 28, 1), '/usr/share/datasets/fashion-mnist', 'dataset-fashion-mnist',
                                 ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                                  'Sneaker', 'Bag', 'Ankle boot')),
    'mnist': DatasetSpec(10, (28, 28, 1), class_names=tuple(str(k) for k in range(10))),
    'cifar10': DatasetSpec(10, (32, 32, 3), class_names=('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                                                         'frog', 'horse', 'ship', 'truck')),
    # Images differ in size (TFDS); the shape is what `data_source=synthetic` generates.
    'imagenet2012': DatasetSpec(1000, (224, 224, 3)),
}


@dataclasses.dataclass
class InMemoryDataset(Source):
  """Arrays held in host memory (IDX files; tests): uint8 images, int32 labels."""
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  source: str               # human-readable: where the data came from
  names: tuple[str, ...] | None = None  # label names; None: '0'..'K-1'
  reads_batches = True      # `reader` also takes a vector of indices

  def class_names(self) -> tuple[str, ...]:
    return tuple(self.names) if self.names else super().class_names()

  def content_digest(self) -> str:
    """The arrays' shapes and bytes (IDX files are small: ~50 ms for Fashion-MNIST)."""
    arrays = (self.train_images, self.train_labels, self.test_images, self.test_labels)
    return digest_of(part for a in arrays for part in (str(a.shape), np.ascontiguousarray(a).data))

  @property
  def description(self) -> str:
    return self.source

  @property
  def image_shape(self):
    return tuple(self.train_images.shape[1:])

  @property
  def channels(self) -> int:
    return self.image_shape[-1]

  def _arrays(self, split):
    return (self.train_images, self.train_labels) if split == 'train' else (self.test_images, self.test_labels)

  def num_examples(self, split: str) -> int:
    return len(self._arrays(split)[1])

  def reader(self, split: str) -> Callable:
    from input_pipeline.tf_host import tf
    images, labels = (tf.constant(a) for a in self._arrays(split))
    return lambda i: (tf.gather(images, i), tf.gather(labels, i))


def data_dir(config) -> str:
  """`config.data_dir` as every source reads it: `~` expanded and absolute when local, a URL unchanged."""
  return paths.resolve_path(config.data_dir)


def how_to_get(name: str) -> str:
  spec = DATASETS.get(name)
  if spec and spec.apt_package:
    return (f'install it with `apt-get install -y {spec.apt_package}`, or prepare it with TFDS on a machine '
            f'with internet (`{setting("data_source")}=tfds {setting("download")}=True`)')
  return (f'prepare it with TFDS on a machine with internet (`{setting("download")}=True`, optionally '
          f'`{setting("data_dir")}=DIR`) or point {setting("data_dir")} at its IDX files')

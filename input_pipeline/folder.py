"""A folder of images, one sub-folder per class, as Keras `image_dataset_from_directory` and torchvision
`ImageFolder` read it:

  DATA_DIR/train/<class>/**/*.{jpg,jpeg,png}
  DATA_DIR/test/<class>/...            (or validation/ or val/; `config.eval_split` picks another name)

Class names, sorted, are the labels 0..K-1 (from train/; an eval class missing from train/ is an error; at
least 2 classes). A file in a sub-folder of a class folder, at any depth, belongs to that class (as in Keras
and torchvision); extensions count in any case (.JPG), dotfiles and dot-folders are skipped, and the files
are listed in a sorted, machine-independent order.
Only the file list is held in memory (paths + labels, ~100 bytes per image); every image is read and decoded
when a batch needs it, by this process only for its own rows.

Start-up checks (cheap, one line naming the file): empty class folders, files that are not JPEG/PNG by
extension, and a header sniff (PIL reads the header only, not the pixels) of every file up to `SNIFF_LIMIT`
per split, evenly spaced beyond: format, size and colour mode. Images are decoded to RGB unless every
sniffed image is grayscale (then 1 channel). Without `config.image_size` every sniffed image must share one
size; a file that fails later (corrupt body, a size the sniff did not see) stops training with a line
naming the file and the step.

`data_dir` may be a bucket URL (`gs://`, `s3://`): the same layout, the same order, labels and digest as the
same folder on a local disk, read through `storage` (the trainer's one route to buckets; TensorFlow's own GCS
client has its endpoint compiled in). Start-up is one recursive listing with sizes (a request per 1000 objects)
plus one ranged read of each sniffed header (in parallel); training reads one request per image, from
tf.data's parallel map threads, so round trips overlap.
"""

import io
import os
from concurrent import futures

import numpy as np
from absl import logging

import storage
from errors import UserError, setting
from input_pipeline import base

EXTENSIONS = ('.jpg', '.jpeg', '.png')
EVAL_DIRS = ('test', 'validation', 'val')
SNIFF_LIMIT = 20000
_GRAYSCALE_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'F')
SNIFF_BYTES = 1 << 16   # A bucket header sniff reads this much first (a JPEG's EXIF/ICC beyond it: the whole file)
SNIFF_THREADS = 32      # Concurrent header reads from a bucket: latency-bound, not CPU-bound


def _listdir(directory: str) -> list[str]:
  return sorted(n for n in os.listdir(directory) if not n.startswith('.'))


def _walk(class_dir: str) -> list[str]:
  """Every file under `class_dir`, at any depth: a folder's own files (sorted), then its sub-folders' (sorted
  by name), so the order, and with it the labels and batches, is the same on every machine. Dotfiles and
  dot-folders are skipped; linked folders are followed, each real folder once (no loop)."""
  out, seen = [], set()

  def visit(directory):
    real = os.path.realpath(directory)
    if real in seen:
      return
    seen.add(real)
    names = _listdir(directory)
    out.extend(os.path.join(directory, n) for n in names if not os.path.isdir(os.path.join(directory, n)))
    for n in names:
      if os.path.isdir(os.path.join(directory, n)):
        visit(os.path.join(directory, n))

  visit(class_dir)
  return out


def _scan(split_dir: str, classes=None) -> tuple[list[str], list[str], np.ndarray]:
  """(classes, file paths, labels) of one split folder; `classes` given: labels from that list."""
  found = [c for c in _listdir(split_dir) if os.path.isdir(os.path.join(split_dir, c))]
  if not found:
    raise UserError(f'{split_dir} has no class folders: lay the images out as {split_dir}/<class>/*.jpg')
  classes = classes or found
  label_of = {c: k for k, c in enumerate(classes)}
  paths, labels = [], []
  for name in found:
    if name not in label_of:
      more = '...' if len(classes) > 10 else ''
      raise UserError(f'{os.path.join(split_dir, name)} is a class that the train folder does not have: '
                      f'rename or remove it (train classes: {", ".join(classes[:10])}{more})')
    class_dir = os.path.join(split_dir, name)
    files = _walk(class_dir)
    if not files:
      raise UserError(f'class folder {class_dir} has no images (nor its sub-folders): add its images or remove the '
                      'folder')
    for path in files:
      if not path.lower().endswith(EXTENSIONS) or not os.path.isfile(path):
        raise UserError(f'{path} is not a JPEG or PNG image (by its name): remove it, or convert it to '
                        f'{"/".join(EXTENSIONS)}')
      paths.append(path)
      labels.append(label_of[name])
  return classes, paths, np.asarray(labels, np.int32)


def _order_key(rel: str):
  """The local walk's order for a '/'-separated path under a class folder: a folder's files before its
  sub-folders, each sorted by name."""
  *dirs, name = rel.split('/')
  return tuple((1, d) for d in dirs) + ((0, name),)


def _scan_url(tree: dict[str, int], directory: str, split: str, classes=None):
  """`_scan` over a bucket listing (`tree`: {path under `directory`: size}): (classes, URLs, labels, sizes)."""
  split_dir = storage.join(directory, split)
  by_class: dict[str, list[str]] = {}
  for rel in tree:
    parts = rel.split('/')
    if parts[0] == split and len(parts) > 2 and not any(p.startswith('.') for p in parts):
      by_class.setdefault(parts[1], []).append('/'.join(parts[2:]))
  found = sorted(by_class)
  if not found:
    raise UserError(f'{split_dir} has no class folders: lay the images out as {split_dir}/<class>/*.jpg')
  classes = classes or found
  label_of = {c: k for k, c in enumerate(classes)}
  paths, labels, sizes = [], [], []
  for name in found:
    if name not in label_of:
      more = '...' if len(classes) > 10 else ''
      raise UserError(f'{storage.join(split_dir, name)} is a class that the train folder does not have: '
                      f'rename or remove it (train classes: {", ".join(classes[:10])}{more})')
    for rel in sorted(by_class[name], key=_order_key):
      path = storage.join(split_dir, name, rel)
      if not rel.lower().endswith(EXTENSIONS):
        raise UserError(f'{path} is not a JPEG or PNG image (by its name): remove it, or convert it to '
                        f'{"/".join(EXTENSIONS)}')
      paths.append(path)
      labels.append(label_of[name])
      sizes.append(tree[f'{split}/{name}/{rel}'])
  return classes, paths, np.asarray(labels, np.int32), sizes


def _headers(paths: list[str]):
  """File objects for PIL: the path itself when local; a bucket's first `SNIFF_BYTES` of each file, read
  `SNIFF_THREADS` at a time, in order (a chunk at a time, so memory stays bounded)."""
  if not paths or not storage.is_url(paths[0]):
    yield from paths
    return
  chunk = 8 * SNIFF_THREADS
  with futures.ThreadPoolExecutor(SNIFF_THREADS) as pool:
    for k in range(0, len(paths), chunk):
      yield from (io.BytesIO(b) for b in pool.map(lambda p: storage.read_bytes(p, end=SNIFF_BYTES),
                                                   paths[k:k + chunk]))


def _open_header(path: str, head):
  """PIL's header parse of `head`; a bucket prefix too short for it (a large EXIF block): the whole file."""
  from PIL import Image
  try:
    return Image.open(head)
  except Exception:
    if isinstance(head, io.BytesIO) and len(head.getvalue()) >= SNIFF_BYTES:
      return Image.open(io.BytesIO(storage.read_bytes(path)))
    raise


def _sniff(paths: list[str]) -> tuple[set, bool]:
  """(set of (height, width), all grayscale) from the headers of (a spread of) `paths`; bad files -> error.

  PIL's own warnings (DecompressionBombWarning above ~89 megapixels, odd EXIF, ...) would print a stack line
  per file on stderr: they become one log line per kind, naming the first file. PIL's pixel limit guards its
  decoder, which never runs here (headers only; TF decodes), so a huge image is reported, not refused.
  """
  import warnings

  from PIL import Image, UnidentifiedImageError
  step = max(1, -(-len(paths) // SNIFF_LIMIT))
  sniffed = paths[::step]
  sizes, gray = set(), True
  large, noted = [], {}  # noted: warning category -> (count, first file, message)
  limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
  try:
    for path, head in zip(sniffed, _headers(sniffed), strict=True):
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
          with _open_header(path, head) as im:
            fmt, (w, h), mode = im.format, im.size, im.mode
        except (UnidentifiedImageError, OSError, ValueError) as e:
          raise UserError(f'{path} is not a readable image ({e.__class__.__name__}: {str(e)[:120]}): '
                          'remove or replace the file') from None
      for w_ in caught:
        count, first, message = noted.get(w_.category.__name__, (0, path, str(w_.message)))
        noted[w_.category.__name__] = (count + 1, first, message)
      if fmt not in ('JPEG', 'PNG'):
        raise UserError(f'{path} is a {fmt} image, not JPEG or PNG: convert or remove it')
      if limit and w * h > limit:
        large.append((path, w, h))
      sizes.add((h, w))
      gray = gray and mode in _GRAYSCALE_MODES
  finally:
    Image.MAX_IMAGE_PIXELS = limit
  if large:
    path, w, h = large[0]
    more = f' (and {len(large) - 1} more)' if len(large) > 1 else ''
    logging.warning('%s%s is %dx%d pixels (%.0f megapixels): decoding it holds ~%.0f MB of host memory per copy; '
                    'resize such images beforehand if memory runs short', path, more, w, h, w * h / 1e6,
                    w * h * 3 / 1e6)
  for category, (count, path, message) in noted.items():
    logging.warning('PIL warned (%s) about %d file(s), first %s: %s', category, count, path, message[:200])
  return sizes, gray


class FolderSource(base.Source):
  """Images in class folders, read as encoded bytes by path."""

  def __init__(self, directory: str, eval_split: str = ''):
    self._sizes = None  # {split: [bytes per file]} from a bucket's listing; local: stat'ed for the digest
    if storage.is_url(directory):
      self._init_url(directory, eval_split)
    else:
      self._init_local(directory, eval_split)
    sizes, gray = _sniff(self._files['train'][0])
    eval_sizes, eval_gray = _sniff(self._files['eval'][0])
    self.channels = 1 if gray and eval_gray else 3
    all_sizes = sizes | eval_sizes
    self.image_shape = next(iter(all_sizes)) + (self.channels,) if len(all_sizes) == 1 else None
    self.num_classes = len(self.classes)

  def _init_url(self, directory: str, eval_split: str):
    directory = directory.rstrip('/')
    tree = storage.walk_files(directory)
    if not tree:
      raise UserError(f'{setting("data_dir")}={directory} does not exist (no objects under it): point it at a '
                      'folder with train/<class>/ and test/<class>/ image folders')
    tops = {rel.split('/', 1)[0] for rel in tree if '/' in rel}
    if 'train' not in tops:
      raise UserError(f'{directory} has no train/ folder: lay the images out as {directory}/train/<class>/*.jpg '
                      'and test/<class>/*.jpg (test may also be named validation or val)')
    names = [eval_split] if eval_split else list(EVAL_DIRS)
    eval_name = next((n for n in names if n in tops), None)
    if eval_name is None:
      raise UserError(f'{directory} has no {" or ".join(n + "/" for n in names)} folder for evaluation: add one '
                      f'(same class folders as train/), or name it with {setting("eval_split")}')
    self.classes, train_paths, train_labels, train_sizes = _scan_url(tree, directory, 'train')
    _, eval_paths, eval_labels, eval_sizes = _scan_url(tree, directory, eval_name, self.classes)
    self._files = {'train': (train_paths, train_labels), 'eval': (eval_paths, eval_labels)}
    self._split_dirs = {'train': storage.join(directory, 'train'), 'eval': storage.join(directory, eval_name)}
    self._sizes = {'train': train_sizes, 'eval': eval_sizes}
    self.description = f'folder:{directory} ({eval_name}/ for eval)'

  def _init_local(self, directory: str, eval_split: str):
    if not os.path.isdir(directory):
      raise UserError(f'{setting("data_dir")}={directory} does not exist: point it at a folder with train/<class>/ '
                      'and test/<class>/ image folders')
    train_dir = os.path.join(directory, 'train')
    if not os.path.isdir(train_dir):
      raise UserError(f'{directory} has no train/ folder: lay the images out as {directory}/train/<class>/*.jpg '
                      'and test/<class>/*.jpg (test may also be named validation or val)')
    names = [eval_split] if eval_split else list(EVAL_DIRS)
    eval_dir = next((os.path.join(directory, n) for n in names if os.path.isdir(os.path.join(directory, n))), None)
    if eval_dir is None:
      raise UserError(f'{directory} has no {" or ".join(n + "/" for n in names)} folder for evaluation: add one '
                      f'(same class folders as train/), or name it with {setting("eval_split")}')
    self.classes, train_paths, train_labels = _scan(train_dir)
    _, eval_paths, eval_labels = _scan(eval_dir, self.classes)
    self._files = {'train': (train_paths, train_labels), 'eval': (eval_paths, eval_labels)}
    self._split_dirs = {'train': train_dir, 'eval': eval_dir}
    self.description = f'folder:{directory} ({os.path.basename(eval_dir)}/ for eval)'

  def num_examples(self, split: str) -> int:
    return len(self._files[split][0])

  @property
  def remote(self) -> bool:
    paths = self._files['train'][0]
    return bool(paths) and storage.is_url(paths[0])

  def fetcher(self, split: str):
    paths = self._files[split][0]
    return lambda indices: storage.read_many([(paths[i], None, None) for i in indices])

  def parser(self, split: str):
    from input_pipeline.tf_host import tf
    labels_t = tf.constant(self._files[split][1])
    return lambda i, data: (tf.ensure_shape(data, []), tf.gather(labels_t, i))

  def reader(self, split: str):
    from input_pipeline.tf_host import tf
    paths, labels = self._files[split]
    if self.remote:
      return base.fetched_reader(self, split)
    paths_t, labels_t = tf.constant(paths), tf.constant(labels)
    return lambda i: (tf.io.read_file(tf.gather(paths_t, i)), tf.gather(labels_t, i))

  def name_of(self, split: str, index: int) -> str:
    return self._files[split][0][index]

  def class_names(self):
    return tuple(self.classes)

  def content_digest(self) -> str:
    """Each split's files as (path relative to its split folder, size in bytes), in label order."""
    parts = []
    for split in base.SPLITS:
      parts.append(split)
      paths, top = self._files[split][0], self._split_dirs[split]
      sizes = self._sizes[split] if self._sizes else [os.path.getsize(p) for p in paths]
      for p, size in zip(paths, sizes, strict=True):
        rel = p[len(top) + 1:] if self._sizes else os.path.relpath(p, top)
        parts += [rel, str(size)]
    return base.digest_of(parts)

  def labels(self, split: str) -> np.ndarray:
    """int32 label of every example of `split`, by index (for readers outside tf.data)."""
    return np.asarray(self._files[split][1], np.int32)


def load(config) -> FolderSource:
  if not config.data_dir:
    raise UserError(f'{setting("data_source")}=folder needs {setting("data_dir")}=DIR with DIR/train/<class>/*.jpg '
                    'and DIR/test/<class>/*.jpg')
  return FolderSource(base.data_dir(config), config.get('eval_split', ''))

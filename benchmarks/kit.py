"""The set-up tests and benchmarks share: configs, `KEY=VALUE` overrides and small in-memory datasets.

One place builds them, so a test and a benchmark that say "the default job at batch 16" build the same thing,
and overrides are read the one way users give them (train.py's `--config.KEY=VALUE`). Imports neither pytest
nor JAX (benchmarks import it before they choose their devices); the product never imports it.

  from benchmarks import kit
  c = kit.config(batch_size=16, model='mlp')          # configs/default.py with these fields
  c = kit.config(small=True, batch_size=16)           # ... and the small-job recipe (SMALL)
  c = kit.overrides(['cpu_kernels=off', 'plot=false']) # parsed as train.py parses --config.KEY=VALUE
  data = kit.dataset(n=64, shape=(8, 8, 1), test=16)  # sources.InMemoryDataset of random uint8 images
"""

from trainer import cli

# The recipe of the small in-process jobs (a few steps on tiny images): a rate that moves the params visibly
# in a few steps, and a constant schedule so no step's rate depends on the run's length.
SMALL = {'learning_rate': 0.05, 'momentum': 0.9, 'lr_schedule': 'constant'}


def config(small: bool = False, **fields):
  """configs/default.py's config (unlocked, as get_config returns it), with SMALL when `small`, then `fields`."""
  from configs import default
  c = default.get_config()
  if small:
    c.update(SMALL)
  c.update(fields)
  return c


def overrides(items, base=None):
  """`base` (default: `config()`) with `KEY=VALUE` items applied as train.py's `--config.KEY=VALUE` applies
  them (same types, same one-line UserError with the nearest key); returned unlocked like `config()`."""
  c = cli.apply_overrides(config() if base is None else base, list(items))
  c.unlock()
  return c


def key_value(item: str):
  """(KEY, VALUE) of one `KEY=VALUE` text: the split `overrides` uses."""
  return cli.key_value(item)


def arrays(n: int, shape=(8, 8, 1), classes: int = 10, seed: int = 0, images='random', labels='random'):
  """(uint8 images of shape (n,) + shape, int32 labels). images: 'random' (uniform 0..255) or 'zeros';
  labels: 'random' (uniform over `classes`) or 'cycle' (index % classes). Random draws come from
  `np.random.default_rng(seed)`, images first."""
  import numpy as np
  rng = np.random.default_rng(seed)
  shape = (n,) + tuple(shape)
  if images == 'random':
    x = rng.integers(0, 256, shape).astype(np.uint8)
  elif images == 'zeros':
    x = np.zeros(shape, np.uint8)
  else:
    raise ValueError(f'images={images!r}: use random or zeros')
  if labels == 'random':
    y = rng.integers(0, classes, n).astype(np.int32)
  elif labels == 'cycle':
    y = (np.arange(n) % classes).astype(np.int32)
  else:
    raise ValueError(f'labels={labels!r}: use random or cycle')
  return x, y


def dataset(n: int = 64, shape=(8, 8, 1), classes: int = 10, seed: int = 0, test=16, images='random',
            labels='random', source: str = 'test'):
  """A small `sources.InMemoryDataset`. `images` / `labels`: a kind for `arrays` or the arrays themselves.
  `test`: an int k (the test split is the first k train examples) or an (images, labels) pair."""
  from input_pipeline import sources
  if isinstance(images, str) or isinstance(labels, str):
    x, y = arrays(n, shape, classes, seed, images if isinstance(images, str) else 'zeros',
                  labels if isinstance(labels, str) else 'cycle')
    images = x if isinstance(images, str) else images
    labels = y if isinstance(labels, str) else labels
  test_images, test_labels = (images[:test], labels[:test]) if isinstance(test, int) else test
  return sources.InMemoryDataset(images, labels, test_images, test_labels, num_classes=classes, source=source)

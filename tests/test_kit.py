"""Tests and benchmarks set up through benchmarks/kit.py: no file builds `default.get_config()` or a
`sources.InMemoryDataset` itself, or splits `KEY=VALUE` by hand (overrides are read as train.py reads them)."""

import os
import re

import pytest

from benchmarks import kit
from errors import UserError
from tests.harness import ROOT

BY_HAND = re.compile(r"default\.get_config\(\)|InMemoryDataset\(|\.(partition|split)\(\s*['\"]=['\"]")
KIT = {os.path.join('benchmarks', 'kit.py'), os.path.join('tests', 'test_kit.py')}


def _by_hand(root):
  found = []
  for part in ('tests', 'benchmarks'):
    for name in sorted(os.listdir(os.path.join(root, part))):
      rel = os.path.join(part, name)
      if name.endswith('.py') and rel not in KIT:
        with open(os.path.join(root, rel)) as f:
          found += [f'{rel}:{n}' for n, line in enumerate(f, 1) if BY_HAND.search(line)]
  return found


def test_set_up_goes_through_the_kit():
  assert _by_hand(ROOT) == []


def test_the_guard_sees_set_up_by_hand(tmp_path):
  for part in ('tests', 'benchmarks'):
    os.makedirs(tmp_path / part)
  (tmp_path / 'tests' / 'a.py').write_text('c = default.get_config()\n')
  (tmp_path / 'benchmarks' / 'b.py').write_text("d = sources.InMemoryDataset(x)\nk, _, v = s.partition('=')\n")
  assert _by_hand(str(tmp_path)) == ['tests/a.py:1', 'benchmarks/b.py:1', 'benchmarks/b.py:2']


def test_overrides_parse_as_train_py_does():
  c = kit.overrides(['batch_size=64', 'plot=false', 'mean=(0.5,)'], base=kit.config(small=True))
  assert (c.batch_size, c.plot, c.mean, c.learning_rate) == (64, False, (0.5,), 0.05)
  with pytest.raises(UserError, match='did you mean --config.learning_rate'):
    kit.overrides(['lr=0.1'])
  with pytest.raises(UserError, match='give KEY=VALUE'):
    kit.overrides(['batch_size'])


def test_dataset_draws_images_then_labels():
  data = kit.dataset(n=12, shape=(4, 4, 1), classes=3, seed=5, test=4)
  x, y = kit.arrays(12, (4, 4, 1), classes=3, seed=5)
  assert (data.train_images == x).all() and (data.train_labels == y).all() and data.num_classes == 3
  assert (data.test_images == x[:4]).all() and y.max() < 3

"""The documentation stays true to the code: every config field and train.py flag is documented, and only those.

Convention (docs/configuration.md): under `## Flags` and `## Config fields`, each table row's first cell names
what the row documents in backticks (`` `--flag` `` or `` `field` ``; a row may name several, e.g.
`` `mean`, `std` ``). Also: every relative link in README.md and docs/*.md resolves, and README.md stays short.
"""

import ast
import os
import re

import pytest

from benchmarks import kit
from tests.harness import ROOT

CONFIG_DOC = os.path.join(ROOT, 'docs', 'configuration.md')
README_MAX_LINES = 300


def _section_names(text: str, heading: str):
  """The backticked names in the first cell of each table row of the `## heading...` section."""
  names = []
  in_section = False
  for line in text.splitlines():
    if line.startswith('## '):
      in_section = line[3:].startswith(heading)
    elif in_section and line.startswith('|'):
      first = line.split('|')[1]
      names += re.findall(r'`([^`]+)`', first)
  return names


def _config_fields(config, prefix=''):
  fields = set()
  for key, value in config.items():
    if hasattr(value, 'items') and len(value):  # An empty ConfigDict (model_kwargs) is one field.
      fields |= _config_fields(value, f'{prefix}{key}.')
    else:
      fields.add(prefix + key)
  return fields


def _train_flags():
  """The flags train.py defines (`flags.DEFINE_*`, `config_flags.DEFINE_config_file`), read without importing it."""
  with open(os.path.join(ROOT, 'train.py')) as f:
    tree = ast.parse(f.read())
  names = set()
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith('DEFINE')
        and node.args and isinstance(node.args[0], ast.Constant)):
      names.add(node.args[0].value)
  return names


def _doc(path):
  with open(path) as f:
    return f.read()


def test_every_config_field_is_documented_and_only_those():
  documented = _section_names(_doc(CONFIG_DOC), 'Config fields')
  fields = _config_fields(kit.config())
  assert not sorted(fields - set(documented)), 'config fields missing from docs/configuration.md'
  assert not sorted(set(documented) - fields), 'docs/configuration.md documents fields configs/default.py lacks'
  assert len(documented) == len(set(documented)), 'a field is documented twice'


def test_every_train_flag_is_documented_and_only_those():
  documented = _section_names(_doc(CONFIG_DOC), 'Flags')
  assert all(name.startswith('--') for name in documented), documented
  flags = _train_flags()
  assert 'workdir' in flags and 'verbose' in flags  # The parser found them.
  documented = {name[2:] for name in documented}
  assert not sorted(flags - documented), 'train.py flags missing from docs/configuration.md'
  assert not sorted(documented - flags), 'docs/configuration.md documents flags train.py lacks'


def _doc_files():
  docs = os.path.join(ROOT, 'docs')
  return [os.path.join(ROOT, 'README.md')] + sorted(
      os.path.join(docs, f) for f in os.listdir(docs) if f.endswith('.md'))


@pytest.mark.parametrize('path', _doc_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
  links = re.findall(r'\]\(([^)\s]+)\)', _doc(path))
  broken = []
  for link in links:
    if re.match(r'[a-z][a-z0-9+.-]*:', link) or link.startswith('#'):  # http(s):, mailto:, in-page anchors
      continue
    target = os.path.normpath(os.path.join(os.path.dirname(path), link.split('#')[0]))
    if not os.path.exists(target):
      broken.append(link)
  assert not broken, f'{os.path.relpath(path, ROOT)} links to missing files: {broken}'


def test_readme_is_short_and_keeps_the_two_commands():
  readme = _doc(os.path.join(ROOT, 'README.md'))
  assert len(readme.splitlines()) <= README_MAX_LINES
  assert 'make train' in readme and 'make test' in readme

"""Code a config names by import path, `MODULE:ATTR`, instead of a registry name (`model`, `augment`, `hooks`).

`MODULE` is imported from `sys.path`: `PYTHONPATH`, the checkout, and the directory of the `--config` file
(appended last, so it never shadows an installed package). `ATTR` may be dotted (`Class.method`). Every
failure (no module, an import that raises, no such attribute) is one `UserError` naming the config field.
"""

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from errors import UserError, first_line, setting


def is_path(value) -> bool:
  """True when a config value names code by import path (`MODULE:ATTR`) rather than a registry entry."""
  return isinstance(value, str) and ':' in value


def add_config_dir(config_path: str) -> None:
  """Makes modules beside the config file importable, so a project outside the checkout keeps its config and
  its model in one directory."""
  directory = os.path.dirname(os.path.abspath(config_path))
  if directory not in sys.path:
    sys.path.append(directory)


def resolve(spec: str, key: str) -> Any:
  """The object `spec` = 'MODULE:ATTR' names; `key` (a config field) is named in the error."""
  module_name, _, attr = spec.partition(':')
  if not module_name or not attr:
    raise UserError(f"{setting(key)}={spec!r} is invalid: name code as 'MODULE:ATTR', e.g. 'my_models:Net'")
  try:
    obj = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      raise UserError(f'{setting(key)}={spec!r}: no module named {e.name!r} on sys.path: put it beside the config '
                      'file, or add its directory to PYTHONPATH') from None
    raise UserError(f'{setting(key)}={spec!r}: importing {module_name} failed ({e.__class__.__name__}: '
                    f'{first_line(e)}): fix that module') from None
  except Exception as e:  # The module raised while importing (SyntaxError included).
    raise UserError(f'{setting(key)}={spec!r}: importing {module_name} failed ({e.__class__.__name__}: '
                    f'{first_line(e)}): fix that module') from None
  for part in attr.split('.'):
    if not hasattr(obj, part):
      names = [n for n in dir(obj) if not n.startswith('_')]
      close = difflib.get_close_matches(part, names, n=1)
      hint = f'did you mean {close[0]}? ' if close else ''
      raise UserError(f'{setting(key)}={spec!r}: {module_name} has no attribute {attr!r}: {hint}name a '
                      'module-level name of it')
    obj = getattr(obj, part)
  return obj


def keywords(fn: Callable) -> tuple:
  """(names `fn` takes by keyword, whether it also takes **kwargs); ((), True) when not inspectable."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return (), True
  names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
  return names, any(p.kind is p.VAR_KEYWORD for p in params)


def nearest(name: str, names: Sequence[str]) -> str:
  """The one of `names` that `name` most likely meant ('' if none is close)."""
  close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.7)
  return close[0] if close else ''

"""Command-line hygiene for train.py: absl / ml_collections parse errors become one `UserError` line
(train.py prints it and exits 2) instead of a traceback."""

import ast
import difflib
import os
import re
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

import libenv
import plugins
from errors import UserError, first_line

# Overrides under this prefix set keyword arguments of a MODULE:ATTR model: keys ml_collections cannot know.
KWARGS_PREFIX = '--config.model_kwargs.'


def parse_flags(flag_values, argv):
  """absl parsing, with config-file and override errors turned into one line."""
  path = _config_path(argv)
  if path and not os.path.isfile(path.split(':', 1)[0]):
    raise UserError(f'--config={path}: no such file: give the path of a config file, e.g. '
                    '--config=configs/default.py (relative paths start at the current directory)')
  if path:
    plugins.add_config_dir(path.split(':', 1)[0])
  argv, model_kwargs = _split_model_kwargs(argv)
  saved_argv = sys.argv  # ml_collections reads the overrides from sys.argv at parse time: hide ours from it.
  try:
    sys.argv = argv
    rest = flag_values(argv)
  except flags.Error as e:
    lines = str(e).strip().splitlines()
    msg = lines[-1] if lines else repr(e)
    if 'Error whilst parsing config file' in str(e):
      msg = f'{path} failed to load ({msg}): fix the config file'
    elif msg.startswith('flag --config.'):
      msg += ': give a value of the type that configs/default.py uses for this key'
    raise UserError(msg) from None
  except SyntaxError as e:
    raise UserError(f'{path} has a Python syntax error at line {e.lineno} ({e.msg}): fix the config file') \
        from None
  except (AttributeError, KeyError) as e:
    unknown = _unknown_override(argv, str(e))
    if not unknown:
      raise UserError(f'{path} failed to load ({e.__class__.__name__}: {first_line(e)}): fix the config file, '
                      'it must define get_config()') from None
    match = re.search(r'Did you mean "([^"]+)"', str(e))
    nearest = match.group(1) if match else _nearest_key(unknown)
    hint = f'did you mean --config.{nearest}? ' if nearest else ''
    raise UserError(f'--config.{unknown}: that config key does not exist: {hint}the keys are listed in '
                    'configs/default.py') from None
  except Exception as e:  # The config file raised while running (an import, get_config()).
    raise UserError(f'{path} failed to load ({e.__class__.__name__}: {first_line(e)}): fix the config file') \
        from None
  finally:
    sys.argv = saved_argv
  if path and not isinstance(flag_values.config, ml_collections.ConfigDict):
    raise UserError(f'{path}: get_config() returned {type(flag_values.config).__name__}, not a ConfigDict: fix the '
                    'config file (see configs/default.py)')
  if path:
    _check_complete(path, flag_values.config)
  if model_kwargs and flag_values.config is not None:
    _set_model_kwargs(flag_values.config, model_kwargs)
  return rest


def key_value(item: str):
  """(KEY, VALUE) of one `KEY=VALUE` override, split at the first `=`."""
  key, sep, value = item.partition('=')
  if not sep or not key:
    raise UserError(f'{item!r}: give KEY=VALUE (a config key, the value after "="), e.g. batch_size=64')
  return key, value


def apply_overrides(config, items) -> ml_collections.ConfigDict:
  """A copy of `config` with each `KEY=VALUE` of `items` set exactly as train.py's `--config.KEY=VALUE`
  sets it: the same absl / ml_collections parse and type rules, the same one-line UserErrors (nearest-key
  hints included), so benchmarks and tests take overrides the way users give them."""
  argv = ['overrides']
  for item in items:
    key, value = key_value(item)
    argv.append(f'--config.{key}={value}')
  parser = _DictFlags(config.copy_and_resolve_references())
  parse_flags(parser, argv)
  return parser.config


class _DictFlags:
  """Flag values holding one in-memory `config` flag: ml_collections parses a config dict's overrides when
  the flag is defined, so the definition happens inside the parse (where parse_flags turns errors into lines)."""

  def __init__(self, config):
    self._base, self._values = config, flags.FlagValues()

  def __call__(self, argv):
    config_flags.DEFINE_config_dict('config', self._base, flag_values=self._values, lock_config=True,
                                    sys_argv=argv)
    return self._values(argv)

  @property
  def config(self):
    return self._values.config


def _split_model_kwargs(argv):
  """(argv without the `--config.model_kwargs.KEY=VALUE` overrides, [(KEY, VALUE)] in order)."""
  rest, pairs = [], []
  for arg in argv:
    if not arg.startswith(KWARGS_PREFIX):
      rest.append(arg)
      continue
    key, sep, value = arg[len(KWARGS_PREFIX):].partition('=')
    if not sep or not key.isidentifier():
      raise UserError(f'{arg}: give {KWARGS_PREFIX}NAME=VALUE (NAME a keyword argument of the model, the value '
                      'after "=")')
    pairs.append((key, value))
  return rest, pairs


def _set_model_kwargs(config, pairs) -> None:
  """Sets each override, typed like the value the config file gave that key, else as a Python literal (a
  bare word stays a string): `width=32` is an int, `act=gelu` a string, `widths=(64,128)` a tuple."""
  if not pairs:
    return
  if not isinstance(config.get('model_kwargs'), ml_collections.ConfigDict):
    raise UserError(f'{KWARGS_PREFIX}{pairs[0][0]}: this config has no model_kwargs ConfigDict: start from '
                    'configs/default.py')
  kwargs = config.model_kwargs
  for key, text in pairs:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if key in kwargs and kwargs[key] is not None:
      old = type(kwargs[key])
      if old is bool and text.lower() in ('true', 'false'):
        value = text.lower() == 'true'
      elif old is str:
        value = text
      elif old in (tuple, list) and type(value) in (tuple, list):
        value = old(value)
      elif type(value) is not old and not (old is float and type(value) is int):  # ConfigDict makes it a float.
        raise UserError(f'{KWARGS_PREFIX}{key}={text}: the config file gives it a {old.__name__} '
                        f'({kwargs[key]!r}): give a value of that type')
    with kwargs.unlocked():
      kwargs[key] = value


def _check_complete(path: str, config) -> None:
  """A config file must define every key of configs/default.py (the trainer reads them all)."""
  from configs import default
  missing = sorted(set(default.get_config().keys()) - set(config.keys()))
  if missing:
    raise UserError(f'{path} does not define {", ".join(missing)}: start from configs/default.py (copy it, or '
                    '`from configs import default` and change fields of default.get_config())')


def verbose(flag_values, argv) -> bool:
  """--verbose as absl reads it (`--verbose`, `--verbose=1`, `--verbose=true`, ...), even when parsing failed."""
  try:
    return bool(flag_values.verbose)
  except flags.Error:  # Not parsed: read argv the way absl would (the last occurrence wins).
    return libenv.verbose_in(argv)


def _config_path(argv) -> str:
  """The --config value in `argv` ('' when absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return ''


# Names other trainers use for our keys, which string similarity alone does not find.
ALIASES = {'lr': 'learning_rate', 'epochs': 'num_epochs', 'bs': 'batch_size', 'steps': 'num_train_steps',
           'train_steps': 'num_train_steps', 'wd': 'weight_decay', 'arch': 'model', 'data': 'data_dir',
           'warmup': 'warmup_steps', 'schedule': 'lr_schedule', 'optim': 'optimizer'}


def _nearest_key(key: str) -> str:
  """The configs/default.py key that `key` most likely meant ('' if none is close): an alias, else difflib."""
  from configs import default
  keys = sorted(default.get_config().keys())
  name = key.split('.')[-1].lower().replace('-', '_')
  if name in ALIASES:
    return ALIASES[name]
  close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
  return close[0] if close else ''


def _unknown_override(argv, message: str) -> str:
  """The --config.KEY override that `message` (an ml_collections lookup error) is about, or ''."""
  for arg in argv:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if f': {key}' in message or any(re.search(rf'\b{re.escape(part)}\b', message) for part in key.split('.')):
        return key
  return ''

"""Entry point: parse flags, set up the topology, call `trainer.loop.train_and_evaluate`.

  python train.py --config=configs/default.py --workdir=/tmp/fmnist [--config.KEY=VALUE ...]

Bad input (config, flags, data, checkpoints, topology) ends with one `error:` line and exit status 2;
`--verbose` shows the traceback too.
"""

import os
import re
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from errors import UserError
from parallel import topology

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl, TensorBoard events, plots.')
config_flags.DEFINE_config_file('config', None, 'Config file (Python, defines get_config()).', lock_config=True)
flags.DEFINE_enum('platform', 'auto', list(topology.PLATFORMS), 'Accelerator platform; auto: what JAX finds.')
flags.DEFINE_integer('num_cpu_devices', -1, 'Simulated CPU devices. -1: auto (on a CPU-only run, the largest '
                     'count <= min(cores, 8) that divides the batch sizes); 0: JAX default (1).')
flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 for a multi-process job.')
flags.DEFINE_integer('num_processes', None, 'Number of processes in the job (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process\'s index, 0..num_processes-1.')
flags.DEFINE_integer('distributed_timeout', 120, 'Seconds to wait for all processes to join the job.')
flags.DEFINE_integer('heartbeat_timeout', 30, 'Seconds of silence after which a process counts as dead and '
                     'the others stop with an error.')
flags.DEFINE_string('coordinator_bind_address', None, 'Where process 0\'s coordinator listens (default: '
                    '--coordinator_address itself; [::]:PORT listens on every interface).')
flags.DEFINE_integer('collective_timeout', 60, 'Seconds before a stuck CPU collective fails the job.')
flags.DEFINE_bool('verbose', False, 'Show Python tracebacks for input errors too.')


def _auto_cpu_devices(config) -> int:
  """The fastest simulated count here: XLA runs one device's step on about one core (see README)."""
  cap = min(os.cpu_count() or 1, 8)
  return max(d for d in range(1, cap + 1) if config.batch_size % d == 0 and config.eval_batch_size % d == 0)


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}: flags look like --name=value')
  if FLAGS.config is None:
    raise UserError('--config is required, e.g. --config=configs/default.py')
  if not FLAGS.workdir:
    raise UserError('--workdir is required: the directory for checkpoints and metrics')
  from trainer import config_check  # Bad values fail here, before any device, process or file is touched.
  config_check.validate(FLAGS.config)
  _check_workdir(FLAGS.workdir)
  num_cpu = FLAGS.num_cpu_devices
  if num_cpu == -1:
    num_cpu = _auto_cpu_devices(FLAGS.config) if FLAGS.platform in ('auto', 'cpu') and \
        not FLAGS.coordinator_address and _cpu_only() else 0
  topology.configure_backend(FLAGS.platform, num_cpu, FLAGS.collective_timeout)
  topology.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                  FLAGS.distributed_timeout, FLAGS.heartbeat_timeout, FLAGS.coordinator_bind_address)
  topology.check_devices(FLAGS.platform, num_cpu if not FLAGS.coordinator_address else num_cpu)
  from trainer import loop  # After the topology: importing JAX-heavy modules must not start the backend early.
  loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def _check_workdir(workdir: str) -> None:
  """Fails early (creating nothing) when `workdir` cannot become a writable directory."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise UserError(f'--workdir={workdir} is not usable: {path} is a file, not a directory: choose another --workdir')
  if not os.access(path, os.W_OK | os.X_OK):
    raise UserError(f'--workdir={workdir} is not writable ({path} denies write access): choose a directory you '
                    'can write to')


def _cpu_only() -> bool:
  """True when no accelerator is visible, checked without starting JAX's backend."""
  import importlib.util
  if FLAGS.platform == 'cpu':
    return True
  has_gpu = any(importlib.util.find_spec(m) for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin'))
  has_tpu = importlib.util.find_spec('libtpu') is not None
  return not (has_gpu or has_tpu)


def run():
  """app.run, with user errors printed as one line instead of a traceback."""
  verbose = '--verbose' in sys.argv or '--verbose=true' in sys.argv
  try:
    app.run(main, flags_parser=_parse_flags)
  except UserError as e:
    if verbose:
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
  """absl parsing, with config-file and override errors turned into one line."""
  path = _config_path(argv)
  if path and not os.path.isfile(path.split(':', 1)[0]):
    raise UserError(f'--config={path}: no such file: give the path of a config file, e.g. '
                    '--config=configs/default.py (relative paths start at the current directory)')
  try:
    rest = FLAGS(argv)
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
      raise UserError(f'{path} failed to load ({e.__class__.__name__}: {_first_line(e)}): fix the config file, '
                      'it must define get_config()') from None
    match = re.search(r'Did you mean "([^"]+)"', str(e))
    hint = f'did you mean --config.{match.group(1)}? ' if match else ''
    raise UserError(f'--config.{unknown}: that config key does not exist: {hint}the keys are listed in '
                    'configs/default.py') from None
  except Exception as e:  # The config file raised while running (an import, get_config()).
    raise UserError(f'{path} failed to load ({e.__class__.__name__}: {_first_line(e)}): fix the config file') \
        from None
  if path and not isinstance(FLAGS.config, ml_collections.ConfigDict):
    raise UserError(f'{path}: get_config() returned {type(FLAGS.config).__name__}, not a ConfigDict: fix the '
                    'config file (see configs/default.py)')
  return rest


def _config_path(argv) -> str:
  """The --config value in `argv` ('' when absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def _unknown_override(argv, message: str) -> str:
  """The --config.KEY override that `message` (an ml_collections lookup error) is about, or ''."""
  for arg in argv:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if f': {key}' in message or any(re.search(rf'\b{re.escape(part)}\b', message) for part in key.split('.')):
        return key
  return ''


def _first_line(e: Exception) -> str:
  return str(e).strip().splitlines()[0][:200] if str(e).strip() else ''


if __name__ == '__main__':
  run()

"""Entry point: parse flags, set up the topology, call `trainer.loop.train_and_evaluate`.

  python train.py --config=configs/default.py --workdir=/tmp/fmnist [--config.KEY=VALUE ...]

Bad input (config, flags, data, checkpoints, topology) ends with one `error:` line and exit status 2;
`--verbose` shows the traceback too.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

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
  num_cpu = FLAGS.num_cpu_devices
  if num_cpu == -1:
    num_cpu = _auto_cpu_devices(FLAGS.config) if FLAGS.platform in ('auto', 'cpu') and \
        not FLAGS.coordinator_address and _cpu_only() else 0
  topology.configure_backend(FLAGS.platform, num_cpu, FLAGS.collective_timeout)
  topology.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                  FLAGS.distributed_timeout)
  topology.check_devices(FLAGS.platform, num_cpu if not FLAGS.coordinator_address else num_cpu)
  from trainer import loop  # After the topology: importing JAX-heavy modules must not start the backend early.
  loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


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
  try:
    return FLAGS(argv)
  except flags.Error as e:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    raise UserError(f'{_config_hint(msg)}') from None


def _config_hint(msg: str) -> str:
  if 'config' in msg and ('No such file' in msg or 'not found' in msg.lower() or 'does not exist' in msg):
    return f'{msg} (check the --config path, e.g. configs/default.py)'
  if 'SyntaxError' in msg or 'invalid syntax' in msg:
    return f'the config file has a Python syntax error: {msg}'
  if 'Could not find' in msg or 'has no field' in msg or 'KeyError' in msg:
    return f'{msg}: that config key does not exist (see README "Config fields")'
  return msg


if __name__ == '__main__':
  run()

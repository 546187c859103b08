"""Entry point: parse flags, set up the topology, call `trainer.loop.train_and_evaluate`.

  python train.py --config=configs/default.py --workdir=/tmp/fmnist [--config.KEY=VALUE ...]

Bad input (config, flags, data, checkpoints, topology) ends with one `error:` line and exit status 2;
`--verbose` shows the traceback too. SIGTERM, SIGHUP, SIGUSR1 or Ctrl-C at any moment ends with one line and exit 0.
"""

import os
import sys
import threading
import time
import traceback

# Run from the checkout (the Flax examples' layout; nothing of ours is installed into site-packages): make
# the checkout importable however this file is started (`python train.py`, runpy.run_path, another cwd).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trainer import preemption  # noqa: E402  (no JAX: light)

preemption.install()  # Before the heavy imports: a signal at any moment ends with one line, never exit 143.

import libenv  # noqa: E402  (no imports: light)

libenv.set_defaults(verbose=libenv.verbose_in(sys.argv))  # Before TensorFlow loads: no CPU-dependent notices.

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import paths  # noqa: E402
import storage  # noqa: E402  (no imports of fsspec until a URL is used: light)
from cpu_kernels import malloc  # noqa: E402
from errors import UserError, claim_line, first_line  # noqa: E402
from parallel import agreement, topology  # noqa: E402
from trainer import cli, reporting, workdir  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl, TensorBoard events, plots.')
config_flags.DEFINE_config_file('config', None, 'Config file (Python, defines get_config()).', lock_config=True)
flags.DEFINE_enum('platform', 'auto', list(topology.PLATFORMS), 'Accelerator platform; auto: what JAX finds.')
flags.DEFINE_integer('num_cpu_devices', -1, 'Simulated CPU devices. -1: auto (on a CPU-only run, the largest '
                     'count <= min(cores, 8) that divides the batch sizes); 0: JAX default (1).')
flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 for a multi-process job.')
flags.DEFINE_integer('num_processes', None, 'Number of processes in the job (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process\'s index, 0..num_processes-1.')
flags.DEFINE_integer('distributed_timeout', 120, 'Seconds to wait for all processes to join the job, and for '
                     'each to report its config and data before the first step.')
flags.DEFINE_integer('heartbeat_timeout', 30, 'Seconds of silence after which a process counts as dead and '
                     'the others stop with an error.')
flags.DEFINE_string('coordinator_bind_address', None, 'Where process 0\'s coordinator listens (default: '
                    '--coordinator_address itself; [::]:PORT listens on every interface).')
flags.DEFINE_integer('collective_timeout', 60, 'Seconds before a stuck CPU collective fails the job.')
flags.DEFINE_bool('verbose', False, 'Show Python tracebacks for input errors, and the native libraries\' start-up '
                  'notices (TensorFlow, absl, gRPC; see libenv.py).')


def _auto_cpu_devices(config) -> int:
  """The fastest simulated count here: XLA runs one device's step on about one core (see README)."""
  cap = min(os.cpu_count() or 1, 8)
  return max(d for d in range(1, cap + 1) if config.batch_size % d == 0 and config.eval_batch_size % d == 0
             and (not config.deterministic or config.virtual_shards % d == 0))


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}: flags look like --name=value')
  if FLAGS.config is None:
    raise UserError('--config is required, e.g. --config=configs/default.py')
  if not FLAGS.workdir:
    raise UserError('--workdir is required: the directory for checkpoints and metrics')
  FLAGS.workdir = paths.resolve_path(FLAGS.workdir)  # `~` expanded, absolute: what every later use (and the log) sees.
  reporting.quiet_library_logs(keep_tracebacks=FLAGS.verbose)
  storage.configure()  # Before Orbax/TFDS/tensorstore load: bucket paths take fsspec and the user's endpoint.
  from trainer import config_check  # Bad values fail here, before any device, process or file is touched.
  config_check.validate(FLAGS.config)
  malloc.restart_for(FLAGS.config)  # May re-exec this command (huge pages): before any lock or file.
  workdir.check(FLAGS.workdir)
  num_cpu = FLAGS.num_cpu_devices
  if num_cpu == -1:
    num_cpu = _auto_cpu_devices(FLAGS.config) if FLAGS.platform in ('auto', 'cpu') and \
        not FLAGS.coordinator_address and _cpu_only() else 0
  topology.configure_backend(FLAGS.platform, num_cpu, FLAGS.collective_timeout,
                             deterministic=FLAGS.config.deterministic)
  topology.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                  FLAGS.distributed_timeout, FLAGS.heartbeat_timeout, FLAGS.coordinator_bind_address)
  topology.check_devices(FLAGS.platform, num_cpu)
  from trainer import loop  # After the topology: importing JAX-heavy modules must not start the backend early.
  loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, agree_timeout_s=FLAGS.distributed_timeout)


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
  preemption.starting()
  try:
    app.run(main, flags_parser=lambda argv: cli.parse_flags(FLAGS, argv))
  except UserError as e:
    if cli.verbose(FLAGS, sys.argv):
      traceback.print_exc()
    _fail(f'error: {e}', now=isinstance(e, agreement.PeerLost))
  except preemption.Stopped as e:
    agreement.stopped(preemption.stopped_line(e))
    preemption.say(preemption.stopped_line(e))
    _exit(0, finalize=False)
  except Exception as e:
    from storage import health
    if health.failing() and not agreement.peer_error(e):  # A library's own error for the outage (Orbax, gcsfs).
      if cli.verbose(FLAGS, sys.argv):
        traceback.print_exc()
      _fail(f'error: {storage.storage_error(FLAGS.workdir, e, "write")}')
    if not agreement.peer_error(e):  # A bug: its traceback stays; the peers still learn at once that it stopped.
      agreement.stopped(f'{e.__class__.__name__}: {first_line(e)}')
      raise
    if cli.verbose(FLAGS, sys.argv):  # A peer lost outside the train loop (joining the workdir, restoring).
      traceback.print_exc()
    print(f'error: {agreement.lost_contact("the run", e)}', file=sys.stderr)
    _exit(2, now=True)


def _fail(line: str, now: bool = False) -> None:
  """Ends with `line` as the run's one error line (a watchdog or lease thread may have claimed it first: then
  that thread prints and ends the process). While storage does not answer, leaves without the exit handlers:
  each request they make would wait out the clients' retries."""
  from storage import health
  if not claim_line():
    time.sleep(10)  # The claiming thread is printing its line, then ends the process.
    _exit(2, now=True)
  agreement.stopped(line)  # Its peers stop now with this line, not after --distributed_timeout.
  print(line, file=sys.stderr)
  _exit(2, now=now or health.failing())


def _exit(code: int, now: bool = False, finalize: bool = True) -> None:
  """Exits with `code`; if a library thread (e.g. Orbax's, after a failed save) would block the interpreter's
  shutdown forever, leaves without waiting for it. `now`: at once, without the exit handlers (a lost peer:
  JAX's shutdown barrier would wait for it, then abort from C++). `finalize=False`: the exit handlers run (the
  workdir lock is released), the interpreter's teardown does not: after a signal stopped the start-up inside
  an import or a backend's set-up, tearing down the half-built native modules can crash (a segfault, seen on
  AMD EPYC in 4 of 5 runs of a SIGHUP 1.5 s after the start)."""
  if not finalize and not now:
    import atexit
    atexit._run_exitfuncs()
    now = True
  if now:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
  deadline = time.monotonic() + 2
  for t in stuck:
    t.join(timeout=max(deadline - time.monotonic(), 0))
  if any(t.is_alive() for t in stuck):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == '__main__':
  run()

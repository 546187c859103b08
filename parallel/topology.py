"""Topology from flags: platform, simulated CPU devices, multi-process runtime, collective timeouts.

`configure_backend` must run before anything starts JAX's backend (simulated devices and XLA flags are
read once, at start). Multi-process jobs use JAX's own runtime (`jax.distributed.initialize`): an explicit
coordinator, or JAX's auto-detection on TPU pods and under Slurm.
"""

import fcntl
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time

from absl import logging

from cpu_kernels import malloc
from errors import UserError, first_line

PLATFORMS = ('auto', 'cpu', 'gpu', 'tpu')
GPU_DETERMINISTIC_FLAG = '--xla_gpu_deterministic_ops=true'


def configure_backend(platform: str = 'auto', num_cpu_devices: int = 0, collective_timeout_s: int = 60,
                      deterministic: bool = False) -> None:
  """Applies platform, simulated device count and XLA collective timeouts; call before JAX starts.
  `deterministic` (the config field) also asks XLA for deterministic GPU kernels (no atomics in reductions
  and scatters, deterministic cuDNN/cuBLAS algorithms); the CPU backend ignores the flag."""
  import jax  # Importing is fine; the backend starts on first use.
  if platform not in PLATFORMS:
    raise UserError(f'unknown --platform={platform}: use one of {", ".join(PLATFORMS)}')
  if num_cpu_devices < 0:
    raise UserError(f'--num_cpu_devices={num_cpu_devices} is negative: use 0 (the default) or a positive count')
  if num_cpu_devices and platform in ('gpu', 'tpu'):
    raise UserError(f'--num_cpu_devices simulates CPU devices and cannot be combined with --platform={platform}: '
                    'drop --num_cpu_devices (real accelerators are used as they are)')
  if platform != 'auto':
    jax.config.update('jax_platforms', platform)
  if num_cpu_devices:
    if platform == 'auto':
      jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', num_cpu_devices)
  # A stuck CPU collective (a dead peer, starved rendezvous) must fail within about a minute, not hang.
  t = int(collective_timeout_s)
  flags = [f'--xla_cpu_collective_timeout_seconds={t}',
           f'--xla_cpu_collective_call_terminate_timeout_seconds={t}',
           f'--xla_cpu_collective_call_warn_stuck_timeout_seconds={max(t // 3, 1)}']
  if deterministic:
    flags.append(GPU_DETERMINISTIC_FLAG)
  existing = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = ' '.join([existing] + [f for f in flags if f.split('=')[0] not in existing]).strip()
  malloc.keep_freed_memory()


def _cluster_detected() -> bool:
  """True on a multi-host TPU slice or a multi-task Slurm job, where JAX finds its peers by itself."""
  if int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_JOB_ID' in os.environ:
    return True
  return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')


def _check_address(address: str) -> None:
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise UserError(f'--coordinator_address={address!r} is not HOST:PORT (e.g. 10.0.0.1:1234)')


def _wait_for_coordinator(address: str, timeout_s: int) -> int:
  """Waits until process 0 listens at `address`; returns the seconds left of `timeout_s` (at least 10)."""
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  while True:
    left = deadline - time.monotonic()
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=max(min(left, 2), 0.1)):
        return max(int(deadline - time.monotonic()), min(timeout_s, 10))
    except socket.gaierror as e:
      raise UserError(f'--coordinator_address={address}: cannot resolve host {host!r} ({e.strerror}): use the '
                      'hostname or IP address of process 0') from None
    except OSError as e:
      if time.monotonic() + 0.5 >= deadline:
        raise UserError(f'nobody listens at --coordinator_address={address} after {timeout_s}s ({e.strerror or e}): '
                        'start process 0 with the same address (it listens there), check host, port and firewall, '
                        'or raise --distributed_timeout') from None
      time.sleep(0.5)


def _claim_process_id(address: str, process_id: int) -> None:
  """Two processes of one job on this host with the same --process_id make JAX abort from C++ (no hook) as
  they register: catch that before joining, with a lock the OS releases when its holder dies."""
  name = re.sub(r'[^A-Za-z0-9_.-]', '_', address)
  path = os.path.join(tempfile.gettempdir(), f'dptrain-{name}-process{process_id}.lock')
  try:
    f = open(path, 'a+')
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    raise UserError(f'another process on this host already runs as --process_id={process_id} of the job at '
                    f'--coordinator_address={address}: give every process its own --process_id') from None
  _held.append(f)


_held = []  # Open lock files, held for the life of the process.


def _check_port_free(bind_address: str) -> None:
  """JAX crashes (SIGSEGV) when the coordinator's port is taken: check it can be bound first."""
  host, _, port = bind_address.rpartition(':')
  host = host.strip('[]')
  try:
    family, kind, proto, _, addr = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As gRPC does: a TIME_WAIT socket is no conflict.
      s.bind(addr)
  except OSError as e:
    raise UserError(f'process 0 cannot listen at {bind_address} ({e.strerror or e}): the port is taken (another '
                    'job still running, or another program) or the address is not this host\'s: choose a free '
                    'port in --coordinator_address for every process') from None


def _initialize_within(timeout_s: int, message: str, **kwargs) -> None:
  """`jax.distributed.initialize`, but past `timeout_s` one `error:` line and exit 2: JAX itself aborts the
  process from C++ (no exception, no hook) when its peers never register."""
  import jax
  done = threading.Event()

  def watchdog():
    if not done.wait(timeout_s):
      print(f'error: {message}', file=sys.stderr, flush=True)
      os._exit(2)

  threading.Thread(target=watchdog, name='join-watchdog', daemon=True).start()
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s + 30, **kwargs)
  finally:
    done.set()


def _compare_flags(num_processes: int, process_id: int, address: str, timeout_s: int) -> None:
  """Right after joining: every process publishes its flags in the coordination service's key-value store and
  checks its peers'. A mismatched --num_processes otherwise joins and trains on a wrong topology."""
  from jax._src import distributed
  client = distributed.global_state.client
  mine = {'num_processes': num_processes, 'coordinator_address': address}
  client.key_value_set(f'dptrain/flags/{process_id}', json.dumps(mine))
  for peer in (range(1, num_processes) if process_id == 0 else (0,)):
    try:
      theirs = json.loads(client.blocking_key_value_get(f'dptrain/flags/{peer}', timeout_s * 1000))
    except Exception as e:  # The peer left, or never published.
      raise UserError(f'process {peer} did not report its flags within {timeout_s}s ({first_line(e)}): start every '
                      'process of the job with the same flags') from None
    for key, value in mine.items():
      if theirs.get(key) != value:
        raise UserError(f'the processes disagree: --{key}={value} here (process {process_id}) but '
                        f'--{key}={theirs.get(key)} on process {peer}: start every process with the same --{key}')


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, timeout_s: int = 120, heartbeat_timeout_s: int = 30,
                           bind_address: str | None = None) -> None:
  """Joins the multi-process job, or does nothing for a single-process run.

  The coordinator (process 0) listens only on `bind_address`, by default the coordinator address itself:
  JAX's coordination service has no authentication, so it must not listen on every interface by accident.
  A peer silent for `heartbeat_timeout_s` makes every other process exit with an error (no hang).
  """
  import jax
  if coordinator_address:
    _check_address(coordinator_address)
    if not num_processes or num_processes < 1:
      raise UserError('--coordinator_address needs --num_processes=N (N >= 1) and --process_id=I')
    if process_id is None or not 0 <= process_id < num_processes:
      raise UserError(f'--process_id={process_id} is out of range for --num_processes={num_processes}: '
                      f'use 0..{num_processes - 1}, a different one on each process')
    if num_processes == 1:
      return
    _claim_process_id(coordinator_address, process_id)
    bind = bind_address or coordinator_address
    if process_id == 0:
      _check_port_free(bind)
    else:  # JAX aborts the process (no exception) when the coordinator never answers.
      timeout_s = _wait_for_coordinator(coordinator_address, timeout_s)
    waiting_for = 'the other processes' if process_id == 0 else 'process 0 to accept it'
    message = (f'could not join the {num_processes}-process job at {coordinator_address} within {timeout_s}s '
               f'(waited for {waiting_for}): start all {num_processes} processes with the same --coordinator_address '
               f'and --num_processes={num_processes}, each with its own --process_id (0..{num_processes - 1}); '
               'check the firewall, or raise --distributed_timeout')
    try:
      _initialize_within(timeout_s, message, coordinator_address=coordinator_address, num_processes=num_processes,
                         process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s,
                         coordinator_bind_address=bind)
    except Exception as e:  # XlaRuntimeError: the RPC server did not start, the peers were refused.
      raise UserError(f'{message} ({first_line(e)})') from None
    _compare_flags(num_processes, process_id, coordinator_address, timeout_s)
  elif num_processes not in (None, 1) or process_id not in (None, 0):
    raise UserError('--num_processes/--process_id need --coordinator_address=HOST:PORT (process 0 listens there)')
  elif _cluster_detected():
    logging.info('Cluster environment detected (Slurm / TPU pod): JAX auto-detects the peers.')
    jax.distributed.initialize(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)


def check_devices(platform: str, num_cpu_devices: int) -> None:
  """Fails fast when the backend did not give what the flags asked for."""
  import jax
  try:
    devices = jax.local_devices()
  except RuntimeError as e:
    logging.debug('JAX backend error: %s', e)
    package = {'gpu': 'jax[cuda12]', 'tpu': 'jax[tpu]'}.get(platform, 'jax')
    raise UserError(f'--platform={platform} is not available on this machine (JAX finds no {platform} device or '
                    f'no jax {platform} plugin is installed): use --platform=auto or --platform=cpu, or install the '
                    f'matching plugin ({package})') from None
  if num_cpu_devices and len(devices) != num_cpu_devices:
    raise UserError(f'--num_cpu_devices={num_cpu_devices} asked for {num_cpu_devices} simulated devices but JAX '
                    f'has {len(devices)}: the backend was started before the flag took effect')


def summary(global_batch: int, backend: str) -> str:
  """One compact table of the topology, for process 0's log."""
  import jax
  n_dev, n_proc = jax.device_count(), jax.process_count()
  rows = [('platform', jax.default_backend()), ('device kind', jax.devices()[0].device_kind),
          ('processes', n_proc), ('devices per process', jax.local_device_count()), ('devices total', n_dev),
          ('global batch', global_batch), ('per-device batch', global_batch // max(n_dev, 1)),
          ('parallel backend', backend), ('host', socket.gethostname())]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'  {k:<{width}}  {v}' for k, v in rows)

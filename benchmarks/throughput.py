"""Training throughput of the real step, pipeline and feed, per backend x device count x global batch.

  python -m benchmarks.throughput [--quick] [--backends=shard_map,pmap] [--devices=1,2,4,8] [--batches=128,512]
                                  [--models=cnn,resnet18,vit_ti] [--rounds=N] [--torch=PYTHON]

Every row builds the default recipe (configs/default.py: the CNN, SGD lr 0.01 momentum 0.99) with
`trainer.job.build` (the trainer's own job builder), compiles its step, and feeds it real Fashion-MNIST batches through
`input_pipeline.pipeline.train_dataset` and `input_pipeline.device_feed.Prefetcher`, with the trainer's bound
on steps in flight (block on the metrics of the step `max_steps_in_flight` back, as trainer/loop.py does).
The `reference` rows run benchmarks/reference_loop.py: the plain single-device tutorial loop.
`--models` adds zoo rows (default: `cnn` only): `resnet18` (small stem) and `vit_ti` (patch 4) on generated
32x32x3 images, 10 classes, the default recipe's optimizer; their backend cell reads `shard_map:resnet18`.

Each device count runs in its own process that simulates exactly that many CPU devices, as the trainer
does (measured: a 2-device mesh inside an 8-device process runs ~20% slower than in a 2-device one).
`--simulated_devices=N` instead runs every row in this process on the first k of N devices. Extra XLA flags
go in the XLA_FLAGS environment variable (configure_backend appends its own; the JSON records the result).
It prints the CPU model, the table (columns: see --help, the same names as the README's table) and the
load average at the start and end of every process: on a machine shared with other jobs every column except
`compile s` and flops moves with the load, so compare rows of one run. `--json=FILE` writes every row, the
per-window figures and the machine (CPU model, cores, JAX, XLA flags, load averages per process) to FILE.
The ratios of the default job to the seed's loop and to PyTorch (docs/performance.md) are measured with
`--devices=2 --batches=128 --rounds=5 --torch=/tmp/torchvenv/bin/python`: every round runs the seed's loop,
PyTorch and the trainer's row one after the other (alternating the order), and the ratios print per round,
since a neighbour's load on a shared VM moves single rounds by 10-20%.
It times the trainer's step and feed, not `trainer.loop.Trainer` itself: windows of steps need a loop it
controls (benchmarks/host_overhead.py measures what the full loop adds).
"""

import argparse
import collections
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

COLUMN_HELP = """columns (the README's Performance table uses the same names):
  backend      reference (benchmarks/reference_loop.py, the plain single-device loop), shard_map or pmap
  devices      simulated CPU devices of the data-parallel mesh
  batch        global batch
  img/s        train images per second: median over timed windows after compile and warm-up
  ms/step      median window time / steps per window
  input wait   share of the windows' time spent blocked on input (Prefetcher.wait_s; for the reference
               rows, the host-side gather and scaling)
  cores busy   process CPU time (all threads: XLA, tf.data, Python) / wall time in the windows
  compile s    time of the first step (trace + compile + one run), first batch already in hand
  GFLOP/s      XLA cost-analysis flops of the compiled step (all devices together) x steps per second
  % peak       GFLOP/s / the best float32 matmul rate (2048^3) measured in the same run, at its start and
               end (the better taken: on a shared machine the denominator moves with the load too)
  RSS MB       ru_maxrss of the row's process: its peak since it started (cumulative over the rows
               before it in that process)
"""

FULL = {'backends': 'shard_map,pmap', 'devices': '1,2,4,8', 'batches': '128,512', 'warmup_s': 6.0,
        'window_s': 2.0, 'windows': 5}
QUICK = {'backends': 'shard_map', 'devices': '1,2', 'batches': '128', 'warmup_s': 0.5, 'window_s': 0.75,
         'windows': 3}


# --models name -> (config overrides, image shape or None for the real Fashion-MNIST).
MODEL_ROWS = {
    'cnn': ({}, None),
    'resnet18': ({'model': 'resnet18', 'stem': 'small'}, (32, 32, 3)),
    'vit_ti': ({'model': 'vit_ti', 'patch_size': 4}, (32, 32, 3)),
}


def _generated(shape, n=2048):
  """Random uint8 images of `shape`, 10 classes: model rows measure speed, not learning."""
  from benchmarks import kit
  return kit.dataset(n=n, shape=shape, classes=10, seed=0, test=256, source='generated')


def _ints(text: str):
  return [int(x) for x in text.split(',') if x.strip()]


def _names(text: str):
  return [x.strip() for x in text.split(',') if x.strip()]


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m benchmarks.throughput', description=__doc__.split('\n')[0],
                              epilog=COLUMN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true', help='CI smoke: a couple of rows, a few seconds of timing')
  p.add_argument('--backends', help=f'comma list of shard_map,pmap (default {FULL["backends"]}; quick: '
                 f'{QUICK["backends"]})')
  p.add_argument('--devices', help=f'comma list of device counts (default {FULL["devices"]}; quick: '
                 f'{QUICK["devices"]})')
  p.add_argument('--batches', help=f'comma list of global batch sizes (default {FULL["batches"]}; quick: '
                 f'{QUICK["batches"]})')
  p.add_argument('--simulated_devices', type=int, default=0,
                 help='simulate N CPU devices in this one process (default 0: one process per device count)')
  p.add_argument('--no_reference', action='store_true', help='skip the plain-loop reference rows')
  p.add_argument('--reference_only', action='store_true', help='only the reference rows (the seed\'s loop)')
  p.add_argument('--warmup_s', type=float, help='seconds of warm-up steps after compile')
  p.add_argument('--window_s', type=float, help='target seconds per timed window')
  p.add_argument('--windows', type=int, help='timed windows per row (the median is reported)')
  p.add_argument('--models', default='cnn', help=f'comma list of {",".join(MODEL_ROWS)} (default cnn)')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='a configs/default.py field for every row, e.g. --set=cpu_kernels=off (repeatable)')
  p.add_argument('--rounds', type=int, default=1,
                 help='run the whole set of row processes N times, each round in the opposite order of the one '
                      'before; each row reports its median round, and a line prints every round\'s ratio to the '
                      'reference (on a shared VM the load moves between processes: one round can mislead)')
  p.add_argument('--torch', metavar='PYTHON',
                 help='also run benchmarks/torch_cnn.py (the same CNN and recipe in PyTorch eager, channels_last, '
                      'its default threads) with this interpreter, as a `pytorch` row of every round and batch '
                      '(torch is not a dependency: e.g. /tmp/torchvenv/bin/python, see the README)')
  p.add_argument('--json', help='write every row, window and machine detail as one JSON object to this file')
  args = p.parse_args(argv)
  if args.rounds < 1:
    p.error('--rounds needs a positive integer')
  if args.simulated_devices and (args.rounds > 1 or args.torch):
    p.error('--rounds and --torch run one process per row: drop --simulated_devices')
  defaults = QUICK if args.quick else FULL
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.backends, args.devices, args.batches = _names(args.backends), _ints(args.devices), _ints(args.batches)
  args.models = _names(args.models)
  from benchmarks import kit
  from errors import UserError
  try:
    kit.overrides(args.set)  # Refused as train.py refuses --config.KEY=VALUE: one line, the nearest key.
    for item in args.set:
      key, value = kit.key_value(item)
      if key in ('batch_size', 'parallel_backend'):
        p.error(f'--set {item!r}: rows set {key} themselves; use --batches / --backends')
      _OVERRIDES[key] = value
  except UserError as e:
    p.error(f'--set: {e}')
  if not args.models or any(m not in MODEL_ROWS for m in args.models):
    p.error(f'--models: use names from {",".join(MODEL_ROWS)}')
  bad = [b for b in args.backends if b not in ('shard_map', 'pmap')]
  if bad:
    p.error(f'unknown backend(s) {bad}: use shard_map and/or pmap')
  if not args.devices or min(args.devices) < 1 or not args.batches or min(args.batches) < 1:
    p.error('--devices and --batches need positive integers')
  return args


def run_per_device_count(args, argv) -> int:
  """One child process per device count (each simulating exactly k devices); one merged table."""
  import subprocess
  import tempfile
  rows, peaks, children = [], [], []
  passthrough = [a for a in argv if not a.startswith(('--devices', '--json', '--simulated_devices', '--no_reference',
                                                      '--reference_only', '--rounds', '--torch'))]
  # The seed's loop runs in a process of its own with glibc's default malloc settings, as the seed ran it
  # (cpu_kernels/malloc.py is the trainer's); the trainer rows run one process per device count.
  from cpu_kernels import malloc
  runs = ([] if args.no_reference else [(1, ['--reference_only'], malloc.glibc_default_env())])
  runs += [(k, ['--no_reference'], None) for k in sorted(args.devices)]
  runs += [('torch', [], None)] if args.torch else []
  rounds = [runs if r % 2 == 0 else runs[::-1] for r in range(args.rounds)]
  with tempfile.TemporaryDirectory() as tmp:
    for i, (r, (k, extra, env)) in enumerate((r, run) for r, order in enumerate(rounds) for run in order):
      if k == 'torch':
        rows += [dict(row, round=r) for row in torch_rows(args)]
        continue
      out = os.path.join(tmp, f'{i}.json')
      cmd = [sys.executable, '-m', 'benchmarks.throughput', *passthrough, f'--devices={k}',
             f'--simulated_devices={k}', f'--json={out}'] + extra
      print(f'--- {k} device(s): {" ".join(cmd[1:])}', file=sys.stderr, flush=True)
      if subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env).returncode or not os.path.exists(out):
        print(f'--- {k} device(s) failed', file=sys.stderr)
        continue
      with open(out) as f:
        child = json.load(f)
      rows += [dict(row, round=r) for row in child['rows']]
      peaks.append(child['peak_gflops'])
      children.append(dict(child['machine'], devices=k, round=r))
  if not rows:
    return 1
  all_rounds = rows
  rows = median_rounds(rows)
  peak = max(peaks)
  for row in rows:  # One denominator for every row: the best peak any child measured.
    if row.get('gflops') is not None:
      row['pct_peak'] = 100 * row['gflops'] / peak
  order = {'reference': 0, 'pytorch': 1, 'shard_map': 2, 'pmap': 3}
  rows.sort(key=lambda r: (r['batch'], order.get(r['backend'], len(order)), r['devices']))
  print(f'CPU: {cpu_model()}, {os.cpu_count()} cores')
  print(table(rows))
  loads = ', '.join(f'{c["devices"]} dev {c["loadavg_start"]:.2f}->{c["loadavg_end"]:.2f}' for c in children)
  print(f'(one process per device count; median of timed windows; peak = best float32 matmul {peak:.1f} '
        f'GFLOP/s measured in these runs; load average at start->end of each process: {loads})')
  if args.rounds > 1:
    print(f'(each row: its median of {args.rounds} rounds, alternating order)')
  for baseline in ('reference', 'pytorch'):
    for line in round_ratios(all_rounds, baseline):
      print(line)
  if args.json:
    machine = {k: v for k, v in children[0].items() if k not in ('devices', 'loadavg_start', 'loadavg_end',
                                                                   'simulated_devices')}
    summary = {'machine': machine, 'processes': [{k: c[k] for k in ('devices', 'simulated_devices', 'loadavg_start',
                                                                     'loadavg_end')} for c in children],
               'peak_gflops': peak, 'rows': rows, 'rounds': args.rounds,
               'rows_every_round': all_rounds if args.rounds > 1 else None}
    with open(args.json, 'w') as f:
      f.write(json.dumps(summary) + '\n')
  return 0


def _row_key(row):
  return row['backend'], row['devices'], row['batch']


def median_rounds(rows):
  """One row per (backend, devices, batch): the round with the median img/s (the lower median for an even
  count), so every column of a row comes from one measurement."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[_row_key(row)].append(row)
  out = []
  for group in groups.values():
    ok = sorted((r for r in group if 'error' not in r), key=lambda r: r['images_per_s'])
    out.append(ok[(len(ok) - 1) // 2] if ok else group[0])
  return out


def round_ratios(rows, baseline: str = 'reference'):
  """Per data-parallel row, its img/s over the `baseline` row of the same batch, in every round with both."""
  base = {(r['round'], r['batch']): r['images_per_s'] for r in rows if r['backend'] == baseline and 'error' not in r}
  ratios = collections.defaultdict(list)
  for r in rows:
    if r['backend'] not in ('reference', 'pytorch') and 'error' not in r and (r['round'], r['batch']) in base:
      ratios[_row_key(r)].append(r['images_per_s'] / base[(r['round'], r['batch'])])
  for (backend, k, batch), values in sorted(ratios.items()):
    yield (f'{backend} {k} dev batch {batch} / {baseline}, per round: ' + ', '.join(f'{v:.2f}x' for v in values) +
           f' (median {statistics.median(values):.2f}x)')


def torch_rows(args):
  """`pytorch` rows from benchmarks/torch_cnn.py under another interpreter (its last stdout line is JSON)."""
  import subprocess
  rows = []
  for batch in args.batches:
    cmd = [args.torch, '-m', 'benchmarks.torch_cnn', '--channels_last', f'--batch={batch}',
           f'--warmup_s={args.warmup_s}', f'--window_s={args.window_s}', f'--windows={args.windows}']
    print(f'--- pytorch: {" ".join(cmd)}', file=sys.stderr, flush=True)
    proc = None
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
          os.path.abspath(__file__))))
      result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError) as e:
      tail = proc.stderr.strip().splitlines()[-1:] if proc else []  # e.g. "No module named 'torch'"
      error = ' '.join([f'{args.torch}: {e.__class__.__name__}: {e}', *tail])[:500]
      print(f'--- pytorch failed: {error}', file=sys.stderr, flush=True)
      rows.append({'backend': 'pytorch', 'devices': 1, 'batch': batch, 'error': error})
      continue
    rows.append({'backend': 'pytorch', 'devices': 1, 'batch': batch, 'images_per_s': result['images_per_s'],
                 'ms_per_step': result['ms_per_step'], 'input_wait': result['input_share'], 'cpu_cores': None,
                 'compile_s': result['first_step_s'], 'gflops': None, 'pct_peak': None, 'maxrss_mb': None,
                 'torch': result['framework'], 'threads': result['threads']})
  return rows


def cpu_model() -> str:
  """The CPU's marketing name (figures only compare within one CPU model)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


# --- machine peak -------------------------------------------------------------------------------------------
def _median_time(fn, reps: int) -> float:
  fn()  # compile / warm
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_peak(n: int = 2048, reps: int = 7, quick: bool = False) -> dict:
  """Measured float32 matmul GFLOP/s: jit on one device, shard_map over the first k devices, numpy."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import PartitionSpec as P

  from parallel import mesh as mesh_lib

  flops = 2.0 * n ** 3
  a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32))
  b = jax.device_put(jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), jnp.float32))
  out = {}
  dot = jax.jit(jnp.dot)
  out['jit_1dev'] = flops / _median_time(lambda: dot(a, b).block_until_ready(), reps) / 1e9
  for k in sorted({os.cpu_count() or 1} if quick else {os.cpu_count() or 1, jax.device_count()}):
    if k < 2 or k > jax.device_count() or n % k:
      continue
    mesh = mesh_lib.make_mesh(num_devices=k)
    sharded = jax.jit(jax.shard_map(jnp.dot, mesh=mesh, in_specs=(P('data'), P()), out_specs=P('data')))
    ak, bk = jax.device_put(a, mesh_lib.batch_sharding(mesh)), jax.device_put(b, mesh_lib.replicated(mesh))
    run = lambda sharded=sharded, ak=ak, bk=bk: sharded(ak, bk).block_until_ready()
    out[f'shard_map_{k}dev'] = flops / _median_time(run, reps) / 1e9
  if not quick:
    an, bn = np.asarray(a), np.asarray(b)
    out['numpy'] = flops / _median_time(lambda: an @ bn, reps) / 1e9
  return out


# --- one data-parallel row ----------------------------------------------------------------------------------
_INITIAL = {}
_OVERRIDES = {}  # --set KEY=VALUE, applied to every row's config


def _config(backend: str, batch: int, model: str = 'cnn'):
  from benchmarks import kit
  config = kit.config(batch_size=batch, parallel_backend=backend, **MODEL_ROWS[model][0])
  return kit.overrides([f'{key}={text}' for key, text in _OVERRIDES.items()], base=config)


def canonical_state(data):
  """The default recipe's initial state, on the host, built once per process.

  Initialising compiles once per mesh (seconds each here); the canonical state is the same for every row
  (same seed, same optimizer-state structure), so it is built once and each row puts a fresh copy on its own
  mesh (fresh buffers matter: the step donates them).
  """
  if 'state' not in _INITIAL:
    import jax

    from parallel import mesh as mesh_lib
    from trainer import job as job_lib
    job = job_lib.build(_config('shard_map', 128), mesh=mesh_lib.make_mesh(num_devices=1), data=data)
    _INITIAL['state'] = jax.device_get(job.initial_state())
  return _INITIAL['state']


def bench_row(backend: str, k: int, batch: int, data, timing, model: str = 'cnn') -> dict:
  """One row: the trainer's own job (`trainer.job.build`) on the first `k` devices, fed by its train feed."""
  import jax

  from parallel import mesh as mesh_lib
  from trainer import job as job_lib

  shape = MODEL_ROWS[model][1]
  data = data if shape is None else _generated(shape)
  config = _config(backend, batch, model)
  job = job_lib.build(config, mesh=mesh_lib.make_mesh(num_devices=k), data=data)
  init = canonical_state(data) if config.model == 'cnn' else job.initial_state()
  state = job.stepper.to_device(jax.device_put(init, mesh_lib.replicated(job.mesh)))
  feed = job.train_feed(0, num_steps=10 ** 7)  # Lazy: only what is taken is made.
  label = backend if model == 'cnn' else f'{backend}:{model}'
  try:
    return _timed_steps(job.stepper, state, feed, label, k, batch, job.config.max_steps_in_flight, timing,
                        flops_stepper=job.flops_stepper())
  finally:
    feed.close()  # The Prefetcher's background thread would outlive the row otherwise.


def _timed_steps(stepper, state, feed, backend: str, k: int, batch: int, max_in_flight: int, timing,
                 flops_stepper=None) -> dict:
  import jax

  from trainer.utilization import cost_flops

  t = time.perf_counter()
  first = next(feed)
  first_batch_s = time.perf_counter() - t
  t = time.perf_counter()
  state, metrics = stepper.train_step(state, first)
  jax.device_get(stepper.metrics(metrics))
  compile_s = time.perf_counter() - t

  pending = collections.deque()
  done = []  # (time, feed.wait_s, process CPU time, metrics) when each step's metrics reached the host

  def dispatch():
    nonlocal state
    state, m = stepper.train_step(state, next(feed))
    pending.append(m)
    while len(pending) > max_in_flight:  # Block on the step `max_in_flight` back, like trainer/loop.py.
      m_host = jax.device_get(stepper.metrics(pending.popleft()))
      done.append((time.perf_counter(), feed.wait_s, time.process_time(), m_host))

  t0 = time.perf_counter()
  while len(done) < 3 or time.perf_counter() - t0 < timing.warmup_s:
    dispatch()
  per_step = (done[-1][0] - done[0][0]) / max(len(done) - 1, 1)
  n = max(2, int(round(timing.window_s / per_step)))
  s0 = len(done) - 1
  while len(done) <= s0 + timing.windows * n:
    dispatch()
  times, waits, cpus = [], [], []
  for j in range(timing.windows):
    (ta, wa, ca, _), (tb, wb, cb, _) = done[s0 + j * n], done[s0 + (j + 1) * n]
    times.append(tb - ta)
    waits.append(wb - wa)
    cpus.append(cb - ca)
  while pending:
    jax.device_get(stepper.metrics(pending.popleft()))
  last = done[-1][3]

  # Cost analysis of the same math (`Job.flops_stepper`: XLA's convolutions); flops are one device's program.
  t = time.perf_counter()
  try:
    flops_one = cost_flops((flops_stepper or stepper).train_step.lower(state, next(feed)))  # No second compile.
  except Exception as e:  # No cost analysis on some backends/versions: report the row without GFLOP/s.
    print(f'  no cost analysis for {backend} dev={k} batch={batch}: {e.__class__.__name__}: {e}', file=sys.stderr)
    flops_one = None
  cost_s = time.perf_counter() - t

  med = statistics.median(times)
  row = {'backend': backend, 'devices': k, 'batch': batch, 'images_per_s': n * batch / med,
         'ms_per_step': 1e3 * med / n, 'input_wait': sum(waits) / sum(times), 'compile_s': compile_s,
         'cpu_cores': sum(cpus) / sum(times),
         'flops_per_step': None if flops_one is None else flops_one * k, 'steps_per_window': n, 'window_s': times,
         'images_per_s_windows': [n * batch / w for w in times], 'first_batch_s': first_batch_s,
         'cost_analysis_s': cost_s, 'final_loss': float(last['loss_sum']) / max(float(last['count']), 1.0)}
  return row


# --- report -------------------------------------------------------------------------------------------------
def _maxrss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.


COLUMNS = [('backend', '{}'), ('devices', '{}'), ('batch', '{}'), ('img/s', '{:.0f}'), ('ms/step', '{:.1f}'),
           ('input wait', '{:.1f}%'), ('cores busy', '{:.2f}'), ('compile s', '{:.2f}'), ('GFLOP/s', '{:.1f}'),
           ('% peak', '{:.1f}'), ('RSS MB', '{:.0f}')]


def _cells(row):
  if 'error' in row:
    return [str(row['backend']), str(row['devices']), str(row['batch']), 'error'] + [''] * (len(COLUMNS) - 4)
  values = [row['backend'], row['devices'], row['batch'], row['images_per_s'], row['ms_per_step'],
            None if row.get('input_wait') is None else 100 * row['input_wait'], row.get('cpu_cores'),
            row['compile_s'], row['gflops'], row['pct_peak'], row['maxrss_mb']]
  return [('-' if v is None else fmt.format(v)) for v, (_, fmt) in zip(values, COLUMNS, strict=True)]


def table(rows) -> str:
  cells = [[c for c, _ in COLUMNS]] + [_cells(r) for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
  fmt = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths, strict=True)))
  return '\n'.join([fmt(cells[0]), '  '.join('-' * w for w in widths)] + [fmt(r) for r in cells[1:]])


def main(argv=None) -> int:
  started = time.perf_counter()
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if not args.simulated_devices:
    return run_per_device_count(args, argv)
  from cpu_kernels import malloc
  from parallel import topology
  if not args.reference_only and any(malloc.huge_pages_wanted(_config('shard_map', 128, m)) for m in args.models):
    malloc.restart_with_huge_pages()  # As train.py does for these configs.
  topology.configure_backend('cpu', args.simulated_devices)  # Before anything starts JAX's backend.
  import jax

  from benchmarks import kit, reference_loop
  from input_pipeline import pipeline, sources  # noqa: F401  (TensorFlow's import: seconds, not in a row)

  load_start = os.getloadavg()
  quiet = lambda msg: print(f'[{time.perf_counter() - started:5.1f}s] {msg}', file=sys.stderr, flush=True)
  data = sources.load(kit.config())
  quiet(f'data: {data.source} {data.train_images.shape}; jax {jax.__version__}, {jax.device_count()} '
        f'simulated {jax.default_backend()} devices on {os.cpu_count()} cores')
  peak_start = matmul_peak(reps=3 if args.quick else 7, quick=args.quick)
  quiet('float32 matmul 2048^3 GFLOP/s: ' + ', '.join(f'{k} {v:.1f}' for k, v in peak_start.items()))

  rows = []

  def finish(row):
    flops = row.get('flops_per_step')
    row['gflops'] = None if not flops else flops * row['images_per_s'] / row['batch'] / 1e9
    row['maxrss_mb'] = _maxrss_mb()
    rows.append(row)
    quiet(f'  {row["backend"]:>9} dev={row["devices"]} batch={row["batch"]}: {row["images_per_s"]:.0f} img/s, '
          f'{row["ms_per_step"]:.1f} ms/step, compile {row["compile_s"]:.2f}s, loss {row["final_loss"]:.3f}')

  for batch in args.batches:
    if not args.no_reference:
      init = canonical_state(data)  # The same initial weights as the data-parallel rows.
      finish(reference_loop.run(data.train_images, data.train_labels, batch=batch, warmup_s=args.warmup_s,
                                window_s=args.window_s, windows=args.windows,
                                variables={'params': init.params, 'batch_stats': init.batch_stats}))
    for backend in ([] if args.reference_only else args.backends):
      for k in args.devices:
        if k > jax.device_count() or batch % k:
          quiet(f'  skip {backend} dev={k} batch={batch}: ' +
                ('too few devices' if k > jax.device_count() else 'batch does not split'))
          continue
        for model in args.models:
          try:
            finish(bench_row(backend, k, batch, data, args, model))
          except Exception as e:  # One broken row (a stuck collective, say) must not lose the others.
            quiet(f'  {backend} {model} dev={k} batch={batch} failed: {e.__class__.__name__}: {str(e)[:300]}')
            rows.append({'backend': backend, 'devices': k, 'batch': batch,
                         'error': f'{e.__class__.__name__}: {e}'[:500], 'images_per_s_windows': []})
          gc.collect()

  peak_end = matmul_peak(reps=3 if args.quick else 7, quick=args.quick)
  quiet('float32 matmul 2048^3 GFLOP/s at the end: ' + ', '.join(f'{k} {v:.1f}' for k, v in peak_end.items()))
  peak = {k: max(v, peak_end.get(k, 0.0)) for k, v in peak_start.items()}
  peak_gflops = max(peak.values())
  for row in rows:
    if 'error' not in row:
      row['pct_peak'] = None if row['gflops'] is None else 100 * row['gflops'] / peak_gflops
  quiet('done')
  print(f'CPU: {cpu_model()}, {os.cpu_count()} cores')
  print(table(rows))
  print(f'(median of {args.windows} windows of ~{args.window_s}s after {args.warmup_s}s warm-up; peak = best '
        f'float32 matmul {peak_gflops:.1f} GFLOP/s measured in this run; RSS MB is the process peak so far, '
        f'cumulative over rows; load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; '
        f'{time.perf_counter() - started:.0f}s total)')
  summary = {'machine': {'cpu_count': os.cpu_count(), 'cpu_model': cpu_model(),
                         'jax': jax.__version__, 'simulated_devices': jax.device_count(),
                         'xla_flags': os.environ.get('XLA_FLAGS', ''), 'config_overrides': dict(_OVERRIDES),
                         'loadavg_start': load_start[0],
                         'loadavg_end': os.getloadavg()[0]},
             'matmul_gflops': peak, 'matmul_gflops_start': peak_start, 'matmul_gflops_end': peak_end,
             'peak_gflops': peak_gflops, 'quick': args.quick,
             'timing': {'warmup_s': args.warmup_s, 'window_s': args.window_s, 'windows': args.windows},
             'rows': [{k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()
                       if k not in ('window_s', 'images_per_s_windows')} |
                      {'images_per_s_windows': [round(x, 1) for x in r['images_per_s_windows']]} for r in rows]}
  if args.json:
    with open(args.json, 'w') as f:
      f.write(json.dumps(summary) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""Paired A/B of the compiled train step under config variants, in one process: is a change really faster?

  python -m benchmarks.step_ab [--quick] [--devices=2] [--batch=128] [--pairs=40] [--steps=8] [--memory]
                               [--config=configs/default.py] VARIANT [VARIANT ...]

Each VARIANT is a comma list of KEY=VALUE config fields (`-` = the config unchanged); the first is the
baseline. Example, the measurement behind `cpu_kernels`' default:
  python -m benchmarks.step_ab cpu_kernels=off cpu_kernels=auto

Why paired: on a shared VM a neighbour's load moves single runs by 10-20%, more than most changes are
worth. Here every variant's job (`trainer.job.build`) is compiled once in the same process, then timed in
short windows of `--steps` steps, one window per variant in turn (the order reversed every other pair), so
each variant's window sits next to the baseline's in time. Per variant it prints the median img/s, the
median of the per-pair ratios to the baseline, and in how many pairs it was the faster.
The step runs on one fixed random batch already on the devices: this measures the step, not the input
pipeline (see benchmarks/throughput.py for the whole feed). It does not run `trainer.loop.Trainer`: the loop's
feed and periodic actions would add noise that hides the 2% differences this is meant to resolve.

`--memory` adds a table of each variant's memory, measured in a fresh process per variant (a process's peak
RSS only grows, so the variants timed together in this one cannot be told apart): XLA's compiled memory
analysis of the train step, per device (arguments, outputs, the donated state aliased onto the outputs, temp =
the step's scratch buffers), and the process's peak RSS before the job is built (imports and the dataset)
and after it compiled and ran `--steps` steps. `--pairs=0 --memory` measures memory only.
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m benchmarks.step_ab', description=__doc__.split('\n')[0])
  p.add_argument('variants', nargs='+', metavar='VARIANT', help='KEY=VALUE[,KEY=VALUE...] or -; the first is the '
                 'baseline')
  p.add_argument('--quick', action='store_true', help='CI smoke: 2 pairs (at most) of 2 steps')
  p.add_argument('--config', default='configs/default.py', help='the config file (default configs/default.py)')
  p.add_argument('--devices', type=int, default=2, help='simulated CPU devices (default 2, the default job)')
  p.add_argument('--batch', type=int, default=0, help='global batch (default: the config\'s)')
  p.add_argument('--pairs', type=int, default=40, help='timed windows per variant (default 40)')
  p.add_argument('--steps', type=int, default=8, help='steps per window (default 8)')
  p.add_argument('--memory', action='store_true', help='also measure each variant\'s memory (XLA\'s analysis of '
                 'the step per device, peak RSS), each in its own process')
  p.add_argument('--json', help='write the per-window figures to this file')
  p.add_argument('--memory_child', help=argparse.SUPPRESS)  # One variant's memory, as JSON to this file.
  args = p.parse_args(argv)
  if args.quick:
    args.pairs, args.steps = min(args.pairs, 2), 2
  if args.devices < 1 or args.pairs < 0 or args.steps < 1 or args.batch < 0:
    p.error('--devices and --steps need positive integers, --pairs one >= 0')
  if args.pairs == 0 and not (args.memory or args.memory_child):
    p.error('--pairs=0 times nothing: use it with --memory')
  if args.memory_child and len(args.variants) != 1:
    p.error('--memory_child takes one VARIANT')
  return args


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('step_ab_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def variant_config(base, text: str):
  """A copy of `base` with the comma-separated KEY=VALUE fields of `text` set as train.py sets
  `--config.KEY=VALUE` (benchmarks/kit.py); a bad item raises its one-line UserError."""
  from benchmarks import kit
  return kit.overrides([] if text == '-' else text.split(','), base=base)


def paired_summary(times, baseline: str) -> dict:
  """{variant: {img_s, ratio, wins}} from {variant: [img/s per window]}, windows paired by position."""
  base = times[baseline]
  return {name: {'img_s': statistics.median(v),
                 'ratio': statistics.median(x / b for x, b in zip(v, base, strict=True)),
                 'wins': sum(x > b for x, b in zip(v, base, strict=True))}
          for name, v in times.items()}


# (column, CompiledMemoryStats field): bytes per device of the compiled step (the per-device program).
MEMORY_FIELDS = (('args', 'argument_size_in_bytes'), ('out', 'output_size_in_bytes'),
                 ('alias', 'alias_size_in_bytes'), ('temp', 'temp_size_in_bytes'),
                 ('code', 'generated_code_size_in_bytes'))


def peak_rss_mib() -> float:
  """This process's peak RSS so far: Linux's VmHWM, the peak of this program's own memory. Not ru_maxrss
  there: a child started by vfork/fork + exec inherits its parent's peak in it (measured: every variant's
  process then reported the parent's 735 MiB)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == 'darwin' else 1024)


def step_memory(stepper, state, batch) -> dict:
  """XLA's memory analysis of the compiled train step for these arguments: {column: bytes per device}."""
  stats = stepper.train_step.lower(state, batch).compile().memory_analysis()
  return {name: int(getattr(stats, field)) for name, field in MEMORY_FIELDS}


class MemoryRunError(RuntimeError):
  """A variant's memory process failed: its last stderr line and exit status (2: a config the job refused)."""

  def __init__(self, message: str, returncode: int):
    super().__init__(message)
    self.returncode = returncode


def measure_memory(args, text: str) -> dict:
  """One variant's memory figures (`--memory_child`), measured in a fresh process of this script."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'memory.json')
    cmd = [sys.executable, '-m', 'benchmarks.step_ab', f'--config={os.path.abspath(args.config)}',
           f'--devices={args.devices}', f'--batch={args.batch}', f'--steps={args.steps}', f'--memory_child={path}',
           text]
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True)
    if proc.returncode != 0:
      last = (proc.stderr.strip().splitlines() or [f'exit status {proc.returncode}'])[-1]
      raise MemoryRunError(f'the memory run of {text} failed: {last.removeprefix("error: ")}', proc.returncode)
    with open(path) as f:
      return json.load(f)


def memory_table(memory: dict) -> str:
  """The `--memory` table: XLA's per-device figures and the peak RSS, in MiB."""
  mib, w = 1 << 20, max([40, *map(len, memory)])
  lines = [f'  {"variant":{w}s} ' + ' '.join(f'{c:>7s}' for c, _ in MEMORY_FIELDS) + '  RSS base  RSS peak']
  for name, m in memory.items():
    lines.append(f'  {name:{w}s} ' + ' '.join(f'{m[c] / mib:7.2f}' for c, _ in MEMORY_FIELDS) +
                 f'  {m["rss_base_mib"]:8.0f}  {m["rss_peak_mib"]:8.0f}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from errors import UserError
  from trainer import config_check
  try:
    if not os.path.isfile(args.config):
      raise UserError(f'--config={args.config} is not a file: pass a config file such as configs/default.py')
    base = load_config(args.config)
    if args.batch:
      base.batch_size = args.batch
    configs = {f'{text}' if args.variants.count(text) == 1 else f'{text}#{i}': variant_config(base, text)
               for i, text in enumerate(args.variants)}
    for c in configs.values():
      config_check.validate(c)
  except (UserError, ValueError) as e:  # A bad config or VARIANT: one line, no traceback.
    print(f'error: {e}', file=sys.stderr)
    return 2
  from cpu_kernels import malloc
  from parallel import topology
  malloc.restart_for(base)  # The malloc settings train.py runs the baseline with.
  topology.configure_backend('cpu', args.devices)
  import jax
  import numpy as np

  from benchmarks.throughput import cpu_model
  from input_pipeline import sources
  from trainer import job as job_lib

  try:
    data = sources.load(base)
    rss_base = peak_rss_mib()  # Imports and the dataset: what every variant's process holds before its job.
    jobs = {name: job_lib.build(c, data=data) for name, c in configs.items()} if args.pairs or \
        args.memory_child else {}
  except UserError as e:  # E.g. a batch that does not split over --devices: one line, as train.py.
    print(f'error: {e}', file=sys.stderr)
    return 2
  runs = {}
  for name, job in jobs.items():
    size = configs[name].batch_size
    rng = np.random.default_rng(0)
    batch = job.stepper.place({'image': rng.random((size,) + job.prep.output_shape, dtype=np.float32),
                               'label': rng.integers(0, data.num_classes, size).astype(np.int32)})
    state = job.stepper.to_device(job.initial_state())
    state, _ = job.stepper.train_step(state, batch)  # Compile and warm.
    jax.block_until_ready(state)
    runs[name] = [job.stepper, state, batch, size]
  if args.memory_child:
    stepper, state, batch, _ = runs[next(iter(runs))]
    for _ in range(args.steps):
      state, _ = stepper.train_step(state, batch)
    jax.block_until_ready(state)
    result = dict(step_memory(stepper, state, batch), rss_base_mib=rss_base, rss_peak_mib=peak_rss_mib())
    with open(args.memory_child, 'w') as f:
      json.dump(result, f)
    return 0
  times = {name: [] for name in runs}
  for pair in range(args.pairs):
    for name in (list(runs) if pair % 2 == 0 else list(runs)[::-1]):
      stepper, state, batch, size = runs[name]
      t = time.perf_counter()
      for _ in range(args.steps):
        state, _ = stepper.train_step(state, batch)
      jax.block_until_ready(state)
      times[name].append(args.steps * size / (time.perf_counter() - t))
      runs[name][1] = state
  summary = paired_summary(times, next(iter(runs))) if runs else {}
  print(f'CPU: {cpu_model()}, {os.cpu_count()} cores; {args.devices} simulated device(s); {args.pairs} pairs of '
        f'{args.steps}-step windows; load average {os.getloadavg()[0]:.2f}')
  for name, r in summary.items():
    print(f'  {name:40s} {r["img_s"]:8.0f} img/s   ratio to the first {r["ratio"]:.3f}   faster in '
          f'{r["wins"]}/{args.pairs} pairs')
  memory = {}
  if args.memory:
    runs.clear()  # Free this process's jobs before the children run.
    try:
      memory = {name: measure_memory(args, text) for name, text in zip(configs, args.variants, strict=True)}
    except MemoryRunError as e:
      print(f'error: {e}', file=sys.stderr)
      return e.returncode
    print(f'memory, one fresh process per variant after {args.steps} steps: XLA\'s analysis of the compiled train '
          'step in MiB per device (alias: the donated state reusing output buffers; temp: scratch), and the '
          'process\'s peak RSS in MiB before the job is built (base) and at the end (peak)')
    print(memory_table(memory))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'cpu': cpu_model(), 'devices': args.devices, 'steps': args.steps, 'summary': summary,
                 'img_s_windows': times, 'memory': memory}, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())

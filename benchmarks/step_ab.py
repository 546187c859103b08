"""Paired A/B of the compiled train step under config variants, in one process: is a change really faster?

  python -m benchmarks.step_ab [--quick] [--devices=2] [--batch=128] [--pairs=40] [--steps=8]
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
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m benchmarks.step_ab', description=__doc__.split('\n')[0])
  p.add_argument('variants', nargs='+', metavar='VARIANT', help='KEY=VALUE[,KEY=VALUE...] or -; the first is the '
                 'baseline')
  p.add_argument('--quick', action='store_true', help='CI smoke: 2 pairs of 2 steps')
  p.add_argument('--config', default='configs/default.py', help='the config file (default configs/default.py)')
  p.add_argument('--devices', type=int, default=2, help='simulated CPU devices (default 2, the default job)')
  p.add_argument('--batch', type=int, default=0, help='global batch (default: the config\'s)')
  p.add_argument('--pairs', type=int, default=40, help='timed windows per variant (default 40)')
  p.add_argument('--steps', type=int, default=8, help='steps per window (default 8)')
  p.add_argument('--json', help='write the per-window figures to this file')
  args = p.parse_args(argv)
  if args.quick:
    args.pairs, args.steps = 2, 2
  if args.devices < 1 or args.pairs < 1 or args.steps < 1 or args.batch < 0:
    p.error('--devices, --pairs and --steps need positive integers')
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
    jobs = {name: job_lib.build(c, data=data) for name, c in configs.items()}
  except UserError as e:  # E.g. a batch that does not split over --devices: one line, as train.py.
    print(f'error: {e}', file=sys.stderr)
    return 2
  runs = {}
  for name, c in configs.items():
    job = jobs[name]
    rng = np.random.default_rng(0)
    batch = job.stepper.place({'image': rng.random((c.batch_size,) + job.prep.output_shape, dtype=np.float32),
                               'label': rng.integers(0, data.num_classes, c.batch_size).astype(np.int32)})
    state = job.stepper.to_device(job.initial_state())
    state, _ = job.stepper.train_step(state, batch)  # Compile and warm.
    jax.block_until_ready(state)
    runs[name] = [job.stepper, state, batch, c.batch_size]
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
  summary = paired_summary(times, next(iter(runs)))
  print(f'CPU: {cpu_model()}, {os.cpu_count()} cores; {args.devices} simulated device(s); {args.pairs} pairs of '
        f'{args.steps}-step windows; load average {os.getloadavg()[0]:.2f}')
  for name, r in summary.items():
    print(f'  {name:40s} {r["img_s"]:8.0f} img/s   ratio to the first {r["ratio"]:.3f}   faster in '
          f'{r["wins"]}/{args.pairs} pairs')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'cpu': cpu_model(), 'devices': args.devices, 'steps': args.steps, 'summary': summary,
                 'img_s_windows': times}, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())

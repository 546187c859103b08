"""Host overhead per step: the trainer's full loop against its bare compiled step, for a tiny model.

  python -m benchmarks.host_overhead [--quick] [--model=mlp] [--batch=8] [--devices=1] [--steps=3000]

A tiny model (the MLP at batch 8 on one device by default) makes the device step cost almost nothing, so
what remains is the host: tf.data, placement, the hand-off from the prefetch thread, metric fetches and the
loop's own Python. On a GPU or TPU every small model hits this ceiling first. Three timings, same job
(`trainer.job.build`), same number of steps:
  bare step      the compiled train step in a Python loop on one already-placed batch (metrics of each step
                 fetched `max_steps_in_flight` steps later, as the loop does)
  step + feed    the same with `job.train_feed` (tf.data + placement + prefetch thread) instead of one batch
  full loop      `trainer.loop.Trainer.run` on a scratch workdir: feed, in-flight bound, periodic actions
                 (logging at the configured interval; no eval or checkpoint inside the timed steps)
It prints µs per step for each, the loop's overhead over the bare step, and the loop's input-wait share.
"""

import argparse
import collections
import os
import sys
import tempfile
import time


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m benchmarks.host_overhead', description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true', help='CI smoke: a few hundred steps')
  p.add_argument('--model', default='mlp', help='a config.model name (default mlp)')
  p.add_argument('--batch', type=int, default=8, help='global batch (default 8)')
  p.add_argument('--devices', type=int, default=1, help='simulated CPU devices (default 1)')
  p.add_argument('--steps', type=int, default=3000, help='timed steps per timing (default 3000)')
  p.add_argument('--log_every', type=int, default=100, help='the loop log interval (default 100)')
  p.add_argument('--steps_per_dispatch', type=int, default=1,
                 help='config.steps_per_dispatch of the full loop (default 1: one dispatch per step)')
  p.add_argument('--data_source', default='auto', help='auto (the real Fashion-MNIST, default) or synthetic '
                 '(generated on the device: no files, no TensorFlow)')
  return p.parse_args(argv)


def _config(args, steps: int):
  from benchmarks import kit
  c = kit.config()
  c.model, c.batch_size, c.eval_batch_size = args.model, args.batch, args.batch
  c.num_train_steps, c.log_every_steps = steps, args.log_every
  c.eval_every_steps = c.checkpoint_every_steps = 10 ** 9  # Only the end-of-run eval and save: outside timing.
  c.lr_schedule, c.plot = 'constant', False
  c.steps_per_dispatch = args.steps_per_dispatch
  c.data_source = args.data_source
  return c


def bare_step(job, steps: int, feed=None) -> float:
  """Seconds for `steps` train steps, metrics fetched `max_steps_in_flight` steps behind."""
  import jax
  stepper = job.stepper
  state = stepper.to_device(job.initial_state())
  own_feed = feed is None
  if own_feed:
    one = next(iter(job.train_feed(0, num_steps=1)))
  pending = collections.deque()
  warm = 50
  for i in range(steps + warm):
    if i == warm:
      jax.block_until_ready(state)
      t = time.perf_counter()
    state, m = stepper.train_step(state, one if own_feed else next(feed))
    pending.append(m)
    while len(pending) > job.config.max_steps_in_flight:
      stepper.metrics(pending.popleft())
  jax.block_until_ready(state)
  return time.perf_counter() - t


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  steps = 300 if args.quick else args.steps
  from cpu_kernels import malloc
  from parallel import topology
  malloc.restart_for(_config(args, steps))  # As train.py does.
  topology.configure_backend('cpu', args.devices)
  r = measure(args, steps)
  print(f'CPU: {_cpu()}, {os.cpu_count()} cores; model {args.model}, batch {args.batch}, {args.devices} device(s), '
        f'{steps} timed steps; full loop: {args.steps_per_dispatch} step(s) per dispatch')
  print(f'  bare step     {r["bare_us"]:8.1f} µs/step')
  print(f'  step + feed   {r["fed_us"]:8.1f} µs/step  (+{r["fed_us"] - r["bare_us"]:.1f})')
  print(f'  full loop     {r["full_us"]:8.1f} µs/step  (+{r["full_us"] - r["bare_us"]:.1f} over the bare step; '
        f'input wait {r["input_wait_pct"]:.1f}%)')
  return 0


def measure(args, steps: int, mesh=None) -> dict:
  """µs per step of the three timings and the loop's input-wait share (%), on `mesh` (default: every device of
  the configured backend; the backend must be set up already)."""
  from input_pipeline import sources
  from trainer import job as job_lib, loop

  data = sources.load(_config(args, steps))
  job = job_lib.build(_config(args, steps + 50), data=data, mesh=mesh)
  bare = bare_step(job, steps)
  feed = job.train_feed(0)
  try:
    fed = bare_step(job, steps, feed)
  finally:
    feed.close()

  # The full loop: Trainer.run over warm+steps steps; time the steps after `warm` from the metrics' wall clock.
  # Warm-up past the first log: with steps_per_dispatch > 1 the 1-step program first compiles just before it.
  warm = args.log_every + 50
  full_job = job_lib.build(_config(args, warm + steps), data=data, mesh=mesh)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = loop.Trainer(full_job, workdir)
    marks = {}
    original = trainer.window.push

    def push(step, metrics):
      original(step, metrics)
      last = step[-1] if isinstance(step, range) else step
      for mark in (warm, warm + steps):
        if mark not in marks and last >= mark:
          trainer.window.drain()
          marks[mark] = (time.perf_counter(), trainer.feed.wait_s, last)
    trainer.window.push = push
    trainer.run()
  (t0, w0, s0), (t1, w1, s1) = marks[warm], marks[warm + steps]
  full, wait = (t1 - t0) * steps / (s1 - s0), (w1 - w0) * steps / (s1 - s0)  # Per `steps` steps.
  us = lambda s: 1e6 * s / steps
  return {'bare_us': us(bare), 'fed_us': us(fed), 'full_us': us(full), 'input_wait_pct': 100 * wait / full}


def _cpu() -> str:
  from benchmarks.throughput import cpu_model
  return cpu_model()


if __name__ == '__main__':
  sys.exit(main())

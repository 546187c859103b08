"""The seed CNN and recipe in PyTorch (CPU, eager), for an outside reference point of train images/sec.

  /tmp/torchvenv/bin/python -m benchmarks.torch_cnn [--threads=N] [--channels_last] [--omp_passive] [--batch=128]

Conv32-BN-ReLU-AvgPool2, Conv64-BN-ReLU-AvgPool2, Dense256-ReLU, Dense10 (3x3 'same' convs, BN momentum 0.9 in
flax's convention = 0.1 in torch's, eps 1e-5), softmax cross-entropy, SGD lr 0.01 momentum 0.99 (torch's and
optax's momentum are the same recursion), batch 128. Fashion-MNIST comes straight from the IDX files with numpy
and gzip; batches are gathered and scaled on the host every step (as the JAX reference loop does) and the loss
is read with `.item()` every step. Images/sec is the median over timed windows after warm-up.

PyTorch, by design not `trainer.loop.Trainer`: the outside reference point.

Differences that do not change the work per step: torch's default weight init, and the flatten order of the
conv features (NCHW here, NHWC in flax: a fixed permutation of the Dense256 weights).

torch is not a project dependency: run this from a separate venv (see benchmarks/README or the report):
  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from input_pipeline import idx, sources

# The project's own IDX reader and dataset table (numpy only: no TensorFlow or JAX is imported here).
DATA_DIR = sources.DATASETS['fashion_mnist'].idx_dir


def load_train(data_dir: str):
  images, labels = idx.load_split(data_dir, 'train', num_classes=10)  # [N, 28, 28, 1]
  return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels.astype(np.int64)  # NCHW


def build(torch, nn, channels_last: bool):
  model = nn.Sequential(
      nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32, eps=1e-5, momentum=0.1), nn.ReLU(), nn.AvgPool2d(2),
      nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64, eps=1e-5, momentum=0.1), nn.ReLU(), nn.AvgPool2d(2),
      nn.Flatten(), nn.Linear(7 * 7 * 64, 256), nn.ReLU(), nn.Linear(256, 10))
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  return model


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m benchmarks.torch_cnn', description=__doc__.split('\n')[0])
  p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads(N); 0 keeps torch\'s default')
  p.add_argument('--channels_last', action='store_true', help='channels_last memory format for model and input')
  p.add_argument('--omp_passive', action='store_true',
                 help='OMP_WAIT_POLICY=PASSIVE (set before torch loads): OpenMP threads sleep instead of spinning '
                      'at barriers; decisive when other processes share the cores')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--warmup_s', type=float, default=2.0)
  p.add_argument('--window_s', type=float, default=2.0)
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--data_dir', default=DATA_DIR)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)

  if args.omp_passive:
    os.environ['OMP_WAIT_POLICY'] = 'PASSIVE'  # libgomp reads it once, when torch loads it.
  import torch
  from torch import nn
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  images, labels = load_train(args.data_dir)
  model = build(torch, nn, args.channels_last)
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99)
  loss_fn = nn.CrossEntropyLoss()
  rng = np.random.default_rng(args.seed)
  steps_per_epoch = len(images) // args.batch
  perm, pos = rng.permutation(len(images)), 0
  input_s, losses = [0.0], []

  def step():
    nonlocal perm, pos
    t = time.perf_counter()
    if pos == steps_per_epoch:
      perm, pos = rng.permutation(len(images)), 0
    idx = perm[pos * args.batch:(pos + 1) * args.batch]
    pos += 1
    x = torch.from_numpy(images[idx]).float().div_(255.0)
    if args.channels_last:
      x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels[idx])
    input_s[0] += time.perf_counter() - t
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())

  t0 = time.perf_counter()
  step()
  first_s = time.perf_counter() - t0
  t0, warm = time.perf_counter(), 0
  while warm < 3 or time.perf_counter() - t0 < args.warmup_s:
    step()
    warm += 1
  n = max(2, int(round(args.window_s / ((time.perf_counter() - t0) / warm))))
  times, waits = [], []
  for _ in range(args.windows):
    t, w = time.perf_counter(), input_s[0]
    for _ in range(n):
      step()
    times.append(time.perf_counter() - t)
    waits.append(input_s[0] - w)
  med = statistics.median(times)
  result = {'framework': f'torch {torch.__version__}', 'threads': torch.get_num_threads(),
            'interop_threads': torch.get_num_interop_threads(), 'channels_last': args.channels_last,
            'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', 'default'),
            'batch': args.batch, 'images_per_s': round(n * args.batch / med, 1),
            'ms_per_step': round(1e3 * med / n, 2),
            'input_share': round(sum(waits) / sum(times), 4), 'first_step_s': round(first_s, 3),
            'steps_per_window': n, 'images_per_s_windows': [round(n * args.batch / w, 1) for w in times],
            'final_loss': round(losses[-1], 4), 'mkldnn': torch.backends.mkldnn.is_available(),
            'cpu_count': os.cpu_count(), 'loadavg': round(os.getloadavg()[0], 2)}
  print(f'torch {torch.__version__} CPU eager, get_num_threads()={result["threads"]}, '
        f'channels_last={args.channels_last}, OMP_WAIT_POLICY={result["omp_wait_policy"]}, '
        f'batch {args.batch}: {result["images_per_s"]:.0f} img/s '
        f'({result["ms_per_step"]:.1f} ms/step, median of {args.windows} windows of {n} steps; '
        f'host batch prep {100 * result["input_share"]:.1f}%; loss {losses[-1]:.3f})')
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())

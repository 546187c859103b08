"""tf.data vs Grain for the same work: a folder of JPEGs -> decode + `imagenet` augmentation -> batches.

  python -m benchmarks.grain_vs_tfdata --data_dir=DIR [--image_size=224] [--batch=128] [--seconds=10]
                                       [--loaders=tfdata,grain_tf,grain_pil,grain_pil_mp]

DIR is a folder source (DIR/train/<class>/*.jpg; `python -m benchmarks.export_images jpegs DIR`). Every
loader reads the same files in the same order (the trainer's `order.epoch_batches`, seed 0) and draws each
example's augmentation from its (seed, step, index), so all of them keep the trainer's guarantee; they differ in
the engine that runs the per-example work:
  tfdata        the trainer's own pipeline (`pipeline.train_dataset`): TF ops on tf.data's C++ thread pool,
                fused JPEG decode-and-crop
  grain_tf      Grain `MapDataset` over the same example list, the same TF per-example function
                (`Preprocess.train` as a `tf.function`) called from Grain's read threads
  grain_pil     Grain with the per-example code of torchvision's ImageFolder recipe (PIL decode of the whole
                JPEG, `RandomResizedCrop` with the same distribution, bilinear resize, flip), on Grain threads:
                the peers' usual CPU path, measured here rather than quoted
  grain_pil_mp  grain_pil in Grain worker processes (`mp_prefetch`, one per core)
Prints images/s, CPU cores busy (this process and its children) and images/s per busy core. The trainer uses
tf.data; this is the measurement behind that choice (README, "Data sources"). Loaders only, no model: not
the `trainer.loop.Trainer` loop.
"""

import argparse
import os
import sys
import time

LOADERS = ('tfdata', 'grain_tf', 'grain_pil', 'grain_pil_mp')


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m benchmarks.grain_vs_tfdata', description=__doc__.split('\n')[0])
  p.add_argument('--data_dir', required=True, help='folder source: DIR/train/<class>/*.jpg')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--seconds', type=float, default=10.0, help='timed seconds per loader (after warm-up)')
  p.add_argument('--warmup_batches', type=int, default=3)
  p.add_argument('--threads', type=int, default=0, help='worker threads/processes per loader (0: one per core)')
  p.add_argument('--loaders', default=','.join(LOADERS), help=f'comma list of {",".join(LOADERS)}')
  args = p.parse_args(argv)
  args.loaders = [x for x in args.loaders.split(',') if x]
  if any(x not in LOADERS for x in args.loaders):
    p.error(f'--loaders: use names from {",".join(LOADERS)}')
  args.threads = args.threads or os.cpu_count() or 1
  return args


def _cpu_seconds() -> float:
  """CPU seconds of this process and its live children (Grain's worker processes)."""
  import psutil
  me = psutil.Process()
  total = 0.0
  for proc in [me] + me.children(recursive=True):
    try:
      t = proc.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


class _Examples:
  """(step, global index) of every example of the train stream, in the trainer's order: a random-access
  sequence (what a Grain `MapDataset` source needs), computed per epoch on demand."""

  def __init__(self, source, batch: int, steps: int):
    from input_pipeline import order
    self._order, self._n, self._batch, self._steps = order, source.num_examples('train'), batch, steps
    self._spe = order.steps_per_epoch(self._n, batch)
    self._cached = (-1, None)  # (epoch, its batches): one tuple, swapped whole, as Grain's threads read it.

  def __len__(self):
    return self._steps * self._batch

  def __getitem__(self, j):
    step = j // self._batch
    epoch, rows = self._cached
    if step // self._spe != epoch:
      epoch = step // self._spe
      rows = self._order.epoch_batches(0, epoch, self._n, self._batch)
      self._cached = (epoch, rows)
    return step, int(rows[step % self._spe][j % self._batch])


def _pil_crop(data: bytes, size: int, rng):
  """torchvision's `RandomResizedCrop(size)` + `RandomHorizontalFlip` on PIL, as an ImageFolder pipeline runs
  them: decode the whole JPEG, pick a window (area 8-100%, aspect 3/4-4/3, 10 tries, else the whole image),
  resize it bilinearly, flip with probability 1/2; then float32 in [0, 1]."""
  import io
  import math

  import numpy as np
  from PIL import Image
  img = Image.open(io.BytesIO(data)).convert('RGB')
  w, h = img.size
  box = (0, 0, w, h)
  for _ in range(10):
    area = w * h * rng.uniform(0.08, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
      box = (x, y, x + cw, y + ch)
      break
  out = np.asarray(img.resize((size, size), Image.BILINEAR, box=box), np.float32) * (1 / 255)
  return out[:, ::-1] if rng.random() < 0.5 else out


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # Grain reads its absl flags (defaults); this script parses its own with argparse.
  from parallel import topology
  topology.configure_backend('cpu', 1)
  import numpy as np
  import tensorflow as tf

  from benchmarks import kit
  from input_pipeline import augment, pipeline, sources

  config = kit.config(data_source='folder', data_dir=args.data_dir, augment='imagenet', image_size=args.image_size,
                      data_threads=args.threads, batch_size=args.batch)
  source = sources.load(config)
  prep = augment.Preprocess.from_config(config, source)
  steps = 10_000
  examples = _Examples(source, args.batch, steps)
  paths = [source.name_of('train', i) for i in range(source.num_examples('train'))]
  labels = source.labels('train')

  def tfdata():
    ds = pipeline.train_dataset(source, prep, seed=0, global_batch=args.batch, rows=(0, args.batch), start_step=0,
                                num_steps=steps, threads=args.threads)
    return pipeline.as_numpy(ds)

  def grain_ds(transform):
    import grain
    ds = grain.MapDataset.source(examples).map(transform).batch(args.batch)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=args.threads, prefetch_buffer_size=4 * args.batch))

  def read(path):
    with open(path, 'rb') as f:
      return f.read()

  def grain_tf():
    fn = tf.function(lambda raw, step, i: prep.train(raw, augment.example_key(0, step, i)),
                     input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64),
                                      tf.TensorSpec([], tf.int64)])
    return iter(grain_ds(lambda e: {'image': fn(tf.constant(read(paths[e[1]])), tf.constant(e[0], tf.int64),
                                                tf.constant(e[1], tf.int64)).numpy(),
                                    'label': labels[e[1]]}))

  def pil_one(e):
    rng = np.random.default_rng([0, e[0], e[1]])  # (seed, step, index): topology-free, as the trainer's keys.
    return {'image': _pil_crop(read(paths[e[1]]), args.image_size, rng), 'label': labels[e[1]]}

  def grain_pil():
    return iter(grain_ds(pil_one))

  def grain_pil_mp():
    import grain
    return iter(grain_ds(pil_one).mp_prefetch(grain.MultiprocessingOptions(num_workers=args.threads)))

  makers = {'tfdata': tfdata, 'grain_tf': grain_tf, 'grain_pil': grain_pil, 'grain_pil_mp': grain_pil_mp}
  print(f'{source.num_examples("train")} JPEGs in {args.data_dir}; {prep.describe()}; batch {args.batch}; '
        f'{args.threads} threads/workers; {os.cpu_count()} cores')
  print(f'  {"loader":<14} {"images/s":>9} {"cores busy":>11} {"img/s/core":>11}')
  for name in args.loaders:
    it = makers[name]()
    for _ in range(args.warmup_batches):
      next(it)
    count, cpu0, t0 = 0, _cpu_seconds(), time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
      batch = next(it)
      count += len(batch['label'])
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    del it
    busy = cpu / wall
    print(f'  {name:<14} {count / wall:>9.0f} {busy:>11.2f} {count / wall / max(busy, 1e-9):>11.0f}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())

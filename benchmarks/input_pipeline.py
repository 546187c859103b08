"""Input-pipeline throughput alone (no model): can it feed the train step?

  python -m benchmarks.input_pipeline [--quick] [--train_images_per_sec=3700] [--seconds=5]
  python -m benchmarks.input_pipeline --data_source=folder --data_dir=DIR --augment=imagenet --image_size=224 \
      --threads=1 --host_only     # JPEG decode + augmentation, images/s on one core

Loads the default config's dataset (Fashion-MNIST IDX files, `configs/default.py`; or the --data_source /
--data_dir given), then times the train stream of global batches (default 128) two ways:
  - host only:  tf.data -> numpy batches (gather + scale to float32 on host threads);
  - to device:  the same, placed on the simulated CPU devices as one global sharded jax.Array per leaf by
                `device_feed.Prefetcher` + `mesh.to_global`, with `block_until_ready` on every batch.
The last column divides the pipeline's images/s by the train step's consumption rate: above 1 the step,
not the input, limits training. No model runs, so not `trainer.loop.Trainer`: this isolates the input.
"""

import os
import sys
import time

from absl import app, flags

from parallel import topology

FLAGS = flags.FLAGS
flags.DEFINE_bool('quick', False, 'About 2 s of measurement in all (a smoke check).')
flags.DEFINE_float('seconds', 5.0, 'Seconds measured per mode (ignored with --quick).')
flags.DEFINE_float('train_images_per_sec', 3700.0, 'Images/s the train step consumes, for the ratio column.')
flags.DEFINE_integer('num_devices', 2, 'Simulated CPU devices the batches are placed on.')
flags.DEFINE_integer('batch_size', 0, 'Global batch; 0: the default config\'s.')
flags.DEFINE_integer('warmup_batches', 5, 'Batches pulled before timing starts (tf.data start-up, first copy).')
flags.DEFINE_string('data_source', '', 'Overrides config.data_source (e.g. folder).')
flags.DEFINE_string('data_dir', '', 'Overrides config.data_dir.')
flags.DEFINE_string('dataset', '', 'Overrides config.dataset (a TFDS name with --data_source=tfds).')
flags.DEFINE_string('augment', 'none', 'config.augment: none | cifar | imagenet.')
flags.DEFINE_integer('image_size', 0, 'config.image_size (0: native).')
flags.DEFINE_integer('threads', 0, 'config.data_threads: tf.data threads (0: one per core).')
flags.DEFINE_bool('host_only', False, 'Skip the to-device mode.')


def _timed(batches, seconds: float, warmup: int, finish=lambda b: b):
  """(batches, elapsed seconds, CPU seconds of this process: all its threads) consumed from `batches` in about
  `seconds`, after `warmup` untimed ones."""
  it = iter(batches)
  for _ in range(warmup):
    finish(next(it))
  count, start, cpu = 0, time.perf_counter(), time.process_time()
  while True:
    finish(next(it))
    count += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      return count, elapsed, time.process_time() - cpu


def main(argv):
  del argv
  topology.configure_backend('cpu', FLAGS.num_devices)
  import storage
  storage.configure()  # As train.py: a bucket data_dir takes fsspec and the user's endpoint.
  # Only now the modules that use JAX: the simulated devices are fixed when its backend starts.
  import jax

  from benchmarks import kit
  from input_pipeline import augment, device_feed, order, pipeline, sources
  from parallel import mesh as mesh_lib

  config = kit.config(augment=FLAGS.augment, image_size=FLAGS.image_size, data_threads=FLAGS.threads)
  if FLAGS.data_source:
    config.data_source = FLAGS.data_source
  if FLAGS.data_dir:
    config.data_dir = FLAGS.data_dir
  if FLAGS.dataset:
    config.dataset = FLAGS.dataset
  batch = FLAGS.batch_size or config.batch_size
  seconds = 1.0 if FLAGS.quick else FLAGS.seconds
  warmup = 2 if FLAGS.quick else FLAGS.warmup_batches

  t = time.perf_counter()
  data = sources.load(config)
  prep = augment.Preprocess.from_config(config, data)
  num_train = data.num_examples('train')
  load_s = time.perf_counter() - t
  mesh = mesh_lib.make_mesh(num_devices=FLAGS.num_devices)
  mesh_lib.check_batch(batch, mesh.devices.size)
  rows = mesh_lib.process_rows(mesh, batch)
  spe = order.steps_per_epoch(num_train, batch)

  def stream():
    # Far more steps than the timing can use: it never runs dry (epochs roll over as in training).
    ds = pipeline.train_dataset(data, prep, seed=config.seed, global_batch=batch, rows=rows, start_step=0,
                                num_steps=1000 * spe, threads=config.data_threads)
    return pipeline.as_numpy(ds)

  results = []
  results.append(('host only (tf.data -> numpy)', *_timed(stream(), seconds, warmup)))
  if not FLAGS.host_only:
    feed = device_feed.Prefetcher(stream(), lambda b: mesh_lib.to_global(mesh, b), config.prefetch_batches)
    try:
      timed = _timed(feed, seconds, warmup, finish=jax.block_until_ready)
    finally:
      feed.close()  # A placement thread still running at interpreter exit can abort the process.
    results.append((f'to device ({mesh.devices.size} x {jax.devices()[0].platform}, prefetch '
                    f'{config.prefetch_batches})', *timed))

  print(f'Input pipeline alone: {config.dataset} from {data.description} ({num_train} train images, '
        f'loaded in {load_s:.1f}s), {prep.describe()}, global batch {batch}, {os.cpu_count()} CPU cores, '
        f'{config.data_threads or os.cpu_count()} tf.data threads')
  width = max(len(r[0]) for r in results)
  header = f'  {"mode":<{width}}  {"batches/s":>10}  {"images/s":>10}  {"x train step":>12}  {"CPU ms/image":>12}'
  print(header)
  print('  ' + '-' * (len(header) - 2))
  for name, n, s, cpu in results:
    ips = n * batch / s
    print(f'  {name:<{width}}  {n / s:>10.1f}  {ips:>10.0f}  {ips / FLAGS.train_images_per_sec:>12.2f}  '
          f'{1e3 * cpu / (n * batch):>12.2f}')
  print(f'  (x train step: images/s over the {FLAGS.train_images_per_sec:.0f} img/s the train step consumes; '
        f'> 1: the input keeps up; CPU: of this process, all threads; {seconds:.0f}s timed per mode after {warmup} '
        'warm-up batches)')
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main)

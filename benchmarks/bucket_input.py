"""Input from a bucket vs the same files on a local disk, behind a latency-injecting proxy.

  python -m benchmarks.bucket_input                     # both parts below, ~10 min on 2 cores
  python -m benchmarks.bucket_input --part=throughput --threads=1,2 --latency_ms=20
  python -m benchmarks.bucket_input --part=first_step --records=100000

A real Cloud Storage emulator (fake-gcs-server, as in the tests: `tests/storage_servers.py`) runs on
127.0.0.1 behind `tests/storage_proxy.FaultProxy`, which holds every request `--latency_ms` before forwarding
it (a round trip to Cloud Storage from a VM in the bucket's region takes tens of ms). Both run on this
machine, so their CPU time is taken from the input pipeline's cores: on a TPU VM the server is elsewhere.

- throughput: `--images` 500x375 JPEGs (smooth random content, ~JPEG quality 90), as an image folder and as a
  TFDS dataset prepared as TFRecord (TFDS' default), on local disk and uploaded to the bucket. For each
  layout and `--threads` count, `benchmarks.input_pipeline --host_only` times the `imagenet` augmentation to
  224 px; the table gives bucket images/s over local images/s at the same thread count.
- first_step: a TFDS TFRecord dataset of `--records` 32x32 PNGs in the bucket; `train.py` (default config,
  2 devices, the dataset's first step) from process start to its `step 1/` log line, with a fresh cache
  (the TFRecord index is built from the bucket) and again with the cached index.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum('part', 'all', ['all', 'throughput', 'first_step'], 'What to measure.')
flags.DEFINE_integer('images', 1500, 'Train JPEGs for the throughput part.')
flags.DEFINE_list('threads', ['1', '2'], 'config.data_threads values to compare at.')
flags.DEFINE_float('latency_ms', 20.0, 'Milliseconds the proxy holds each request.')
flags.DEFINE_float('seconds', 6.0, 'Seconds timed per throughput measurement.')
flags.DEFINE_integer('pairs', 3, 'Interleaved local/bucket measurements per row (the table gives medians).')
flags.DEFINE_integer('records', 100_000, 'Train records for the first_step part.')
flags.DEFINE_string('tmp', '', 'Where to build the datasets (default: a new temporary folder, removed after).')

JPEG_NAME, PNG_NAME = 'dptrain_bench_jpegs', 'dptrain_bench_pngs'


def _jpegs(n: int, seed: int):
  """n (JPEG bytes, label): 500x375 smooth random colour fields with noise, as photos compress (~60-90 KB)."""
  import io

  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(seed)
  for i in range(n):
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    big = np.asarray(small.resize((500, 375), Image.BICUBIC), np.float32)
    big = np.clip(big + rng.normal(0, 9, big.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(big).save(out, 'JPEG', quality=90)
    yield out.getvalue(), i % 10


_EXAMPLES = {}  # TFDS name -> {split: callable -> iterable of (encoded image or uint8 array, label)}


def _builder(name: str, shape, fmt: str):
  """A TFDS GeneratorBasedBuilder (named `name`) that prepares `_EXAMPLES[name]`."""
  import io

  import tensorflow_datasets as tfds

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=shape, encoding_format=fmt),
        'label': tfds.features.ClassLabel(num_classes=10)}), supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in _EXAMPLES[name]}

  def _generate_examples(self, split):
    for i, (image, label) in enumerate(_EXAMPLES[name][split]()):
      yield i, {'image': io.BytesIO(image) if isinstance(image, bytes) else image, 'label': label}

  camel = ''.join(w.title() for w in name.split('_'))
  return type(camel, (tfds.core.GeneratorBasedBuilder,), {
      'VERSION': tfds.core.Version('1.0.0'), '__module__': __name__, '_info': _info,
      '_split_generators': _split_generators, '_generate_examples': _generate_examples})


def _prepare_jpegs(root: str, n: int) -> tuple[str, str]:
  """(folder root, TFDS data_dir) holding the same JPEGs: n train, n // 10 test."""
  import tensorflow_datasets as tfds
  splits = {'train': list(_jpegs(n, 0)), 'test': list(_jpegs(max(20, n // 10), 1))}
  folder = os.path.join(root, 'folder')
  for split, items in splits.items():
    for i, (data, label) in enumerate(items):
      os.makedirs(os.path.join(folder, split, f'c{label}'), exist_ok=True)
      with open(os.path.join(folder, split, f'c{label}', f'{i:06d}.jpg'), 'wb') as f:
        f.write(data)
  tfds_dir = os.path.join(root, 'tfds')
  _EXAMPLES[JPEG_NAME] = {s: (lambda s=s: splits[s]) for s in splits}
  _builder(JPEG_NAME, (None, None, 3), 'jpeg')(data_dir=tfds_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=4))
  return folder, tfds_dir


def _prepare_pngs(root: str, n: int) -> str:
  import numpy as np
  import tensorflow_datasets as tfds

  def arrays(count, seed):
    rng = np.random.default_rng(seed)
    for _ in range(count):  # A random 8x8 field upsampled, with noise: ~2.5 KB PNGs, as CIFAR-10's compress.
      field = np.repeat(np.repeat(rng.integers(0, 256, (8, 8, 3)), 4, 0), 4, 1) + rng.normal(0, 8, (32, 32, 3))
      yield np.clip(field, 0, 255).astype(np.uint8), int(rng.integers(10))
  tfds_dir = os.path.join(root, 'pngs')
  _EXAMPLES[PNG_NAME] = {'train': lambda: arrays(n, 0), 'test': lambda: arrays(1000, 1)}
  _builder(PNG_NAME, (32, 32, 3), 'png')(data_dir=tfds_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=16))
  return tfds_dir


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _images_per_sec(args, env) -> tuple[float, float]:
  """(images/s, CPU ms per image of the input pipeline's process) of one benchmarks.input_pipeline run."""
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.input_pipeline', '--host_only', '--augment=imagenet',
                         '--image_size=224', f'--seconds={FLAGS.seconds}', *args], env=env, capture_output=True,
                        text=True, timeout=900)
  match = re.search(r'host only \(tf\.data -> numpy\)\s+([\d.]+)\s+(\d+)\s+[\d.]+\s+([\d.]+)', proc.stdout)
  if proc.returncode or not match:
    raise RuntimeError(f'benchmarks.input_pipeline failed ({proc.returncode}): {proc.stderr[-3000:]}')
  return float(match.group(2)), float(match.group(3))


def _cpu_s(pid: int) -> float:
  """User + system CPU seconds of process `pid` so far."""
  with open(f'/proc/{pid}/stat') as f:
    fields = f.read().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def _throughput(root, gcs_url, server, proxy, env):
  import statistics

  import storage
  t = time.perf_counter()
  folder, tfds_dir = _prepare_jpegs(root, FLAGS.images)
  print(f'prepared {FLAGS.images} train JPEGs as a folder ({_du(folder) / 2**20:.0f} MiB) and as TFRecord '
        f'({_du(tfds_dir) / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f}s', flush=True)
  storage.upload_tree(folder, f'{gcs_url}/folder')
  storage.upload_tree(tfds_dir, f'{gcs_url}/tfds')
  layouts = {'folder': (['--data_source=folder'], folder, f'{gcs_url}/folder'),
             'tfrecord': (['--data_source=tfds', f'--dataset={JPEG_NAME}'], tfds_dir, f'{gcs_url}/tfds')}
  rows = []
  for name, (args, local, remote) in layouts.items():
    for threads in FLAGS.threads:
      common = [*args, f'--threads={threads}']
      local_ips, bucket_ips, ratios, costs, cpu_ratios = [], [], [], [], []
      for _ in range(FLAGS.pairs):  # Interleaved: a slow spell of the machine hits both sides alike.
        ips, local_cpu = _images_per_sec([*common, f'--data_dir={local}'], env)
        local_ips.append(ips)
        before, server_s, proxy_s = proxy.requests, _cpu_s(server.proc.pid), time.process_time()
        ips, bucket_cpu = _images_per_sec([*common, f'--data_dir={remote}'], env)
        bucket_ips.append(ips)
        cpu_ratios.append(local_cpu / bucket_cpu)
        requests = max(1, proxy.requests - before)
        costs.append(((_cpu_s(server.proc.pid) - server_s) / requests, (time.process_time() - proxy_s) / requests))
        ratios.append(bucket_ips[-1] / local_ips[-1])
        print(f'  {name:<9} threads {threads}: local {local_ips[-1]:6.0f} img/s ({local_cpu:.2f} ms CPU/img), '
              f'bucket {bucket_ips[-1]:6.0f} img/s ({bucket_cpu:.2f} ms CPU/img; {ratios[-1]:.0%}), {requests} '
              'requests', flush=True)
      server_ms, proxy_ms = (1e3 * statistics.median(c[i] for c in costs) for i in (0, 1))
      rows.append((name, threads, statistics.median(local_ips), statistics.median(bucket_ips),
                   statistics.median(ratios), statistics.median(cpu_ratios), server_ms, proxy_ms))
  print(f'\nimagenet augmentation of 500x375 JPEGs to 224 px, host only, {FLAGS.latency_ms:.0f} ms per request, '
        f'{os.cpu_count()} cores ({_cpu()}); medians of {FLAGS.pairs} interleaved pairs:')
  print(f'  {"layout":<9} {"threads":>7} {"local img/s":>12} {"bucket img/s":>13} {"bucket/local":>13} '
        f'{"CPU/img local/bucket":>21} {"server ms CPU/req":>18} {"proxy ms CPU/req":>17}')
  for name, threads, local_ips, bucket_ips, ratio, cpu_ratio, server_ms, proxy_ms in rows:
    print(f'  {name:<9} {threads:>7} {local_ips:>12.0f} {bucket_ips:>13.0f} {ratio:>13.0%} {cpu_ratio:>21.0%} '
          f'{server_ms:>18.2f} {proxy_ms:>17.2f}')
  print('  (the emulator and the proxy run on these cores; on a TPU VM the server is elsewhere. CPU/img '
        'local/bucket: the\n  input pipeline process\'s own CPU per image, local over bucket: the share of the '
        'local images/s that\n  its cores alone allow the bucket run)')


def _first_step(root, gcs_url, env):
  import storage
  t = time.perf_counter()
  tfds_dir = _prepare_pngs(root, FLAGS.records)
  print(f'prepared {FLAGS.records} 32x32 PNG records as TFRecord ({_du(tfds_dir) / 2**20:.0f} MiB) in '
        f'{time.perf_counter() - t:.0f}s', flush=True)
  storage.upload_tree(tfds_dir, f'{gcs_url}/pngs')
  cache = os.path.join(root, 'first-step-cache')
  for label in ('fresh cache', 'cached index'):
    workdir = os.path.join(root, f'run-{label.replace(" ", "-")}')
    cmd = [sys.executable, 'train.py', '--config=configs/default.py', f'--workdir={workdir}', '--num_cpu_devices=2',
           '--config.data_source=tfds', f'--config.dataset={PNG_NAME}', f'--config.data_dir={gcs_url}/pngs',
           '--config.num_train_steps=1', '--config.log_every_steps=1', '--config.plot=False']
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**env, 'DPTRAIN_CACHE_DIR': cache}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first, tail = None, []
    for line in proc.stdout:
      tail = (tail + [line])[-20:]
      if first is None and re.search(r'\bstep 1/', line):
        first = time.perf_counter() - start
    proc.wait()
    if proc.returncode or first is None:
      raise RuntimeError(f'train.py failed ({proc.returncode}): {"".join(tail)}')
    print(f'  {FLAGS.records} records in the bucket, {label}: {first:.1f}s from start to the first step', flush=True)


def _cpu() -> str:
  with open('/proc/cpuinfo') as f:
    return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), 'unknown CPU')


def main(argv):
  del argv
  from tests import storage_servers
  from tests.harness import free_port
  from tests.storage_proxy import LatencyProxy

  root = FLAGS.tmp or tempfile.mkdtemp(prefix='bucket-input-')
  port = free_port()
  server = storage_servers.start_gcs(external_url=f'http://127.0.0.1:{port}')
  proxy = LatencyProxy(server.url, port, latency_s=FLAGS.latency_ms / 1000)
  env = {**os.environ, 'STORAGE_EMULATOR_HOST': proxy.url, 'DPTRAIN_CACHE_DIR': os.path.join(root, 'cache'),
         'TF_CPP_MIN_LOG_LEVEL': '2'}
  previous = storage_servers.apply_env({'STORAGE_EMULATOR_HOST': server.url})  # Uploads skip the latency.
  try:
    import storage
    storage.configure()
    gcs_url = f'gs://{server.new_bucket()}'
    if FLAGS.part in ('all', 'throughput'):
      _throughput(root, gcs_url, server, proxy, env)
    if FLAGS.part in ('all', 'first_step'):
      _first_step(root, gcs_url, env)
  finally:
    storage_servers.restore_env(previous)
    proxy.stop()
    server.stop()
    if not FLAGS.tmp:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)

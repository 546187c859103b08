"""Smoke runs of the benchmark scripts (`--quick`): they run and print their figures. No timing asserts."""

import json
import os
import subprocess
import sys

import pytest

import libenv
from input_pipeline import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = sources.DATASETS['fashion_mnist'].idx_dir

# The benchmarks measure the real default job's data; `make test` installs it where apt exists.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir(FASHION_MNIST),
                                reason=f'{FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)')]


def _env():
  """A user's environment: the benchmarks must quiet the native libraries themselves (`libenv`)."""
  env = {k: v for k, v in os.environ.items() if k not in libenv.QUIET and k != 'XLA_FLAGS'}
  return env


def _run(*args):
  env = _env()
  proc = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_throughput_quick_prints_rows(tmp_path):
  path = str(tmp_path / 'bench.json')
  out = _run('benchmarks.throughput', '--quick', '--devices=2', '--simulated_devices=2', '--set=cpu_kernels=off',
             f'--json={path}')
  header = next(line for line in out.splitlines() if line.startswith('backend'))
  assert header.split() == ['backend', 'devices', 'batch', 'img/s', 'ms/step', 'input', 'wait', 'cores', 'busy',
                            'compile', 's', 'GFLOP/s', '%', 'peak', 'RSS', 'MB'], header  # The README's names.
  assert 'CPU: ' in out and not any(line.startswith('{') for line in out.splitlines())  # JSON only in the file.
  with open(path) as f:
    summary = json.load(f)
  rows = {(r['backend'], r['devices']): r for r in summary['rows']}
  assert set(rows) == {('reference', 1), ('shard_map', 2)}
  for row in rows.values():
    assert row['images_per_s'] > 0 and row['flops_per_step'] > 1e9  # ~3.4 GFLOP per step of 128 images.
  assert 0 < summary['peak_gflops']
  assert summary['machine']['config_overrides'] == {'cpu_kernels': 'off'}


def test_step_ab_quick_compares_variants_and_names_a_bad_one(tmp_path):
  path = str(tmp_path / 'ab.json')
  out = _run('benchmarks.step_ab', '--quick', f'--json={path}', 'cpu_kernels=off', 'cpu_kernels=auto,plot=false')
  lines = [line.split() for line in out.splitlines() if line.startswith('  ')]
  assert [line[0] for line in lines] == ['cpu_kernels=off', 'cpu_kernels=auto,plot=false'], out
  assert float(lines[0][1]) > 0 and lines[0][7] == '1.000', out  # The baseline's ratio to itself.
  with open(path) as f:
    assert len(json.load(f)['img_s_windows']['cpu_kernels=off']) == 2
  env = _env()
  bad = subprocess.run([sys.executable, '-m', 'benchmarks.step_ab', '--quick', 'cpu_kernels=off', 'cpu_kernels=nope'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
      "error: --config.cpu_kernels='nope' is invalid: use one of auto, off"], bad.stderr
  uneven = subprocess.run([sys.executable, '-m', 'benchmarks.step_ab', '--quick', '--devices=3', '-'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert uneven.returncode == 2 and uneven.stderr.strip().splitlines()[-1].startswith(
      'error: --config.batch_size=128 does not split over 3 devices'), uneven.stderr
  assert 'Traceback' not in uneven.stderr


def test_step_ab_memory_measures_each_variant_in_its_own_process(tmp_path):
  path = str(tmp_path / 'mem.json')
  out = _run('benchmarks.step_ab', '--quick', '--pairs=0', '--memory', f'--json={path}', '-', 'batch_size=64')
  lines = out.splitlines()
  header = next(i for i, line in enumerate(lines) if line.split()[:1] == ['variant'])
  assert lines[header].split() == ['variant', 'args', 'out', 'alias', 'temp', 'code', 'RSS', 'base', 'RSS',
                                   'peak'], out
  assert [line.split()[0] for line in lines[header + 1:]] == ['-', 'batch_size=64'], out
  with open(path) as f:
    memory = json.load(f)['memory']
  full, half = memory['-'], memory['batch_size=64']
  # Per device: the 64 fewer rows (28x28x1 float32 images, int32 labels) split over the 2 devices; same state.
  assert full['args'] - half['args'] == 64 * (28 * 28 * 4 + 4) // 2, memory
  assert full['out'] == half['out'] and full['alias'] == half['alias'] > 0, memory
  assert full['temp'] > half['temp'] > 0, memory  # Activations scale with the batch.
  for m in (full, half):
    assert m['rss_peak_mib'] > m['rss_base_mib'] > 0, memory
  # A job the variant's own process refuses: its one error line, the exit status 2 of a refused config.
  uneven = subprocess.run([sys.executable, '-m', 'benchmarks.step_ab', '--pairs=0', '--memory', '--devices=3', '-'],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert uneven.returncode == 2 and uneven.stderr.strip().splitlines() == [
      'error: the memory run of - failed: --config.batch_size=128 does not split over 3 devices: use a multiple '
      'of 3, e.g. 126 or 129'], uneven.stderr


def test_step_ab_pairs_windows_by_position():
  from benchmarks import step_ab
  summary = step_ab.paired_summary({'a': [100, 200, 100], 'b': [110, 180, 130]}, 'a')
  assert summary['a'] == {'img_s': 100, 'ratio': 1.0, 'wins': 0}
  assert summary['b']['ratio'] == 1.1 and summary['b']['wins'] == 2 and summary['b']['img_s'] == 130
  from benchmarks import kit
  from errors import UserError
  c = step_ab.variant_config(kit.config(), 'cpu_kernels=off,batch_size=64,plot=false')
  assert (c.cpu_kernels, c.batch_size, c.plot) == ('off', 64, False)
  with pytest.raises(UserError, match='nonsense'):
    step_ab.variant_config(kit.config(), 'nonsense')
  with pytest.raises(UserError, match='--config.batch_size=abc'):
    step_ab.variant_config(kit.config(), 'batch_size=abc')


def test_input_pipeline_quick_prints_table():
  out = _run('benchmarks.input_pipeline', '--quick')
  assert 'images' in out.lower() and 'to device' in out.lower(), out


def test_grain_vs_tfdata_prints_every_loader(tmp_path):
  from tests.image_folders import make_image_folder
  root = make_image_folder(str(tmp_path / 'jpegs'), per_class=(12, 2), size=(40, 30), fmt='jpg')
  out = _run('benchmarks.grain_vs_tfdata', f'--data_dir={root}', '--image_size=16', '--batch=4', '--seconds=0.3',
             '--warmup_batches=1', '--loaders=tfdata,grain_tf,grain_pil')  # grain_pil_mp: the same code, workers.
  rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith('  ')}
  for name in ('tfdata', 'grain_tf', 'grain_pil'):
    assert name in rows and float(rows[name][0]) > 0, out


def test_throughput_set_refuses_the_fields_rows_set():
  from benchmarks import throughput
  with pytest.raises(SystemExit):
    throughput.parse_args(['--set=batch_size=64'])
  with pytest.raises(SystemExit):
    throughput.parse_args(['--set=no_such_field=1'])


def test_rounds_report_the_median_round_and_every_ratio():
  from benchmarks import throughput
  rows = [{'backend': 'reference', 'devices': 1, 'batch': 128, 'images_per_s': v, 'round': r, 'cpu': r}
          for r, v in enumerate((900.0, 1000.0, 800.0))]
  rows += [{'backend': 'shard_map', 'devices': 2, 'batch': 128, 'images_per_s': v, 'round': r, 'cpu': r}
           for r, v in enumerate((2700.0, 2000.0, 2400.0))]
  rows.append({'backend': 'pmap', 'devices': 2, 'batch': 128, 'error': 'stuck', 'round': 0})
  merged = {r['backend']: r for r in throughput.median_rounds(rows)}
  assert merged['reference']['images_per_s'] == 900.0 and merged['reference']['cpu'] == 0  # One whole round.
  assert merged['shard_map']['images_per_s'] == 2400.0 and merged['shard_map']['cpu'] == 2
  assert 'error' in merged['pmap']
  (line,) = throughput.round_ratios(rows)
  assert line.startswith('shard_map 2 dev batch 128') and '3.00x, 2.00x, 3.00x (median 3.00x)' in line, line


def test_device_check_dry_run_on_the_cpu(tmp_path):
  """benchmarks/device_check.py --platform=cpu on the GPU host's package set (no TensorFlow, TFDS, clu; and
  ml_collections only as a wheel in --wheels): every section runs and prints, and the CPU compared with itself
  passes exactly."""
  import zipfile

  import ml_collections

  from tests import test_lean_host
  site = str(tmp_path / 'site')
  test_lean_host.lean_site(site, packages=[p for p in test_lean_host.HOST_PACKAGES if p != 'ml-collections'])
  wheels = tmp_path / 'wheels'
  wheels.mkdir()
  package = os.path.dirname(ml_collections.__file__)
  with zipfile.ZipFile(wheels / 'ml_collections-0-py3-none-any.whl', 'w') as whl:  # As `pip download` gives it.
    for folder, _, files in os.walk(package):
      for name in files:
        path = os.path.join(folder, name)
        whl.write(path, os.path.relpath(path, os.path.dirname(package)))
  path = str(tmp_path / 'check.json')
  env = dict(_env(), PYTHONPATH=site)
  proc = subprocess.run([sys.executable, '-S', '-m', 'benchmarks.device_check', '--platform=cpu', f'--json={path}',
                         f'--wheels={wheels}'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  out = proc.stdout
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert out.splitlines()[0].startswith('Device: cpu x 1 (cpu); JAX ') and out.splitlines()[-1].startswith('PASS'), out
  with open(path) as f:
    check = json.load(f)
  assert check['wheels_on_path'] == ['ml_collections-0-py3-none-any.whl']
  assert set(check['compare']) == {'cnn', 'resnet18'}
  for row in check['compare'].values():
    assert row['pass'] and row['same_batches'] and row['max_rel_loss_diff'] == 0 and len(row['losses_cpu']) == 3
  for name in ('resnet50', 'vit_b16'):
    assert check[name]['images_per_s'] > 0 and 0 < check[name]['mfu'] < 1, check[name]
  assert check['generator_images_per_s'] > 0 and set(check['host_overhead']) == {'1', '32'}


@pytest.mark.slow
def test_bucket_input_prints_the_bucket_and_local_rows(tmp_path):
  """Tiny sizes: the bucket rows read through the latency proxy (requests counted). The first-step part runs
  train.py on a bucket TFRecord dataset, as tests/test_bucket_tfds.py does: not again here (suite time)."""
  out = _run('benchmarks.bucket_input', '--part=throughput', '--images=160', '--threads=1', '--pairs=1',
             '--seconds=1', '--latency_ms=5', f'--tmp={tmp_path}')
  rows = [r for r in (line.split() for line in out.splitlines()) if len(r) == 8 and r[0] in ('folder', 'tfrecord')]
  assert [r[0] for r in rows] == ['folder', 'tfrecord'] and all(float(r[3]) > 0 for r in rows), out
  assert all(int(line.split(', ')[-1].split()[0]) >= 128 for line in out.splitlines() if 'requests' in line), out

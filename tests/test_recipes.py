"""The named recipe configs run; the profiler writes a trace; eval-only reproduces the last eval and leaves the
checkpoints alone; utilisation figures reach the log. In-process `Trainer` runs on simulated CPU devices."""

import glob
import hashlib
import importlib
import json
import os

import numpy as np
import pytest

from benchmarks import kit
from errors import UserError
from parallel import mesh as mesh_lib
from tests.conftest import make_fake_mnist
from trainer import job as job_lib, loop, utilization

# Narrow the nets (the recipes' optimizer, schedule, dtype, smoothing, EMA... stay): full width would compile
# for minutes on 2 cores. tests/test_models.py checks the full-size architectures' parameter counts.
NARROW = dict(resnet_width=8, resnet_stages='1', batch_size=16, eval_batch_size=16, num_train_steps=3,
              log_every_steps=1, checkpoint_every_steps=3, plot=False)


def _train(config, workdir, num_devices=2, data=None):
  job = job_lib.build(config, mesh=mesh_lib.make_mesh(num_devices), data=data)
  return loop.Trainer(job, str(workdir)).run()


def _events(workdir, kind):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [e for e in map(json.loads, f) if e.get('kind') == kind]


@pytest.mark.slow
@pytest.mark.parametrize('name,dataset,extra', [
    ('cifar10_resnet18', 'cifar10', {}),
    ('fashion_mnist_resnet', 'fashion_mnist', {}),
    # Mock ImageNet images have random sizes; 64 px instead of 224 keeps the narrowed ResNet-50 quick.
    ('imagenet_resnet50', 'imagenet2012', {'image_size': 64, 'warmup_steps': 1})])
def test_named_config_runs_under_tfds_mock_data(tmp_path, name, dataset, extra):
  import tensorflow_datasets as tfds
  config = importlib.import_module(f'configs.{name}').get_config()
  config.update(NARROW, data_source='tfds', data_dir=str(tmp_path / 'tfds'), download=True, **extra)
  assert config.dataset == dataset
  with tfds.testing.mock_data(num_examples=48):
    final = _train(config, tmp_path / 'run')
  assert final['step'] == 3 and final['test_examples'] == 48 and np.isfinite(final['test_loss'])
  assert 'test_top5_accuracy' in final


def _tiny(data_dir, **overrides):
  c = importlib.import_module('configs.tiny').get_config()
  c.data_dir = data_dir
  c.update(overrides)
  return c


@pytest.mark.slow
def test_profile_writes_a_trace_and_utilisation_is_logged(tmp_path):
  data_dir = make_fake_mnist(str(tmp_path / 'data'), num_train=256)
  _train(_tiny(data_dir, num_epochs=1, profile_steps=2, log_every_steps=2), tmp_path / 'run')
  assert glob.glob(str(tmp_path / 'run' / 'profile' / '**' / '*.xplane.pb'), recursive=True)
  train = _events(tmp_path / 'run', 'train')
  assert all(e['images_per_sec_per_device'] == pytest.approx(e['images_per_sec'] / 2, rel=1e-2) for e in train)
  assert all(0 < e['mfu'] < 1 and e['flops_per_step'] > 0 for e in train)


def _checkpoint_digest(workdir):
  """Every file under checkpoints/ with its content hash and mtime."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'checkpoints', '**'), recursive=True)):
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        out[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
  return out


@pytest.mark.slow
def test_eval_only_reproduces_the_last_eval_and_touches_no_checkpoint(tmp_path):
  data_dir = make_fake_mnist(str(tmp_path / 'data'), num_train=256)
  run = tmp_path / 'run'
  # Stop at step 6 of 8: eval-only must still not train on.
  _train(_tiny(data_dir, num_epochs=2, eval_every_steps=6, checkpoint_every_steps=6, num_train_steps=6), run)
  last, train_events = _events(run, 'eval')[-1], _events(run, 'train')
  before = _checkpoint_digest(run)
  result = _train(_tiny(data_dir, num_epochs=2, eval_every_steps=6, eval_only=True), run, num_devices=4)
  assert _checkpoint_digest(run) == before
  evals = _events(run, 'eval')
  assert evals[-1]['eval_only'] and evals[-1]['step'] == last['step'] == result['step'] == 6
  for key in ('test_loss', 'test_accuracy', 'test_examples'):
    assert evals[-1][key] == pytest.approx(last[key], rel=1e-5)
  assert _events(run, 'train') == train_events  # Nothing trained.


def test_eval_only_without_a_checkpoint_is_one_error(tmp_path):
  data_dir = make_fake_mnist(str(tmp_path / 'data'), num_train=128)
  with pytest.raises(UserError, match='eval_only needs a checkpoint'):
    _train(_tiny(data_dir, eval_only=True), tmp_path / 'run')


def test_peak_table_and_cpu_probe():
  assert utilization.table_peak('TPU v4', 'bfloat16') == 275e12
  assert utilization.table_peak('TPU v5 lite', 'bfloat16') == 197e12
  assert utilization.table_peak('NVIDIA H100 80GB HBM3', 'float32') == 494.5e12
  assert utilization.table_peak('Some Future Chip', 'bfloat16') is None
  assert 1e9 < utilization.device_peak(mesh_lib.make_mesh(2), 'float32') < 1e13  # Measured on the CPU.


def test_new_fields_are_off_by_default():
  """The seed's job is unchanged: every recipe option defaults to off."""
  c = kit.config()
  assert (c.label_smoothing, c.ema_decay, c.grad_accum_steps, c.lr_per_256, c.profile_steps, c.eval_only) == (
      0.0, 0.0, 1, False, 0, False)

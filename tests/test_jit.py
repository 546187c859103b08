"""The jit backend and FSDP through the product: config refusals, layout-free checksums, checkpoints that
resume between replicated and FSDP states and across device counts, `state_bytes_per_device`.

(Step-math comparisons with shard_map are in test_parallel.py.)
"""

import numpy as np
import pytest

from benchmarks import kit
from errors import UserError
from parallel import mesh as mesh_lib
from tests import harness
from tests.conftest import make_fake_mnist
from tests.test_parallel import _data
from trainer import checkpoints, config_check, job as job_lib


def _config(**overrides):
  return kit.config(**overrides)


@pytest.mark.parametrize('overrides,match', [
    (dict(parallel_backend='jit', bn_mode='local'), "bn_mode='local' is invalid.*parallel_backend=shard_map or pmap"),
    (dict(shard_params='fsdp'), 'shard_params=.fsdp.*needs --config.parallel_backend=jit'),
    (dict(parallel_backend='pmap', shard_params='fsdp'), 'needs --config.parallel_backend=jit'),
    (dict(parallel_backend='jit', shard_params='zero3'), 'use one of none, fsdp'),
    (dict(parallel_backend='jit', shard_params='fsdp', fsdp_min_bytes=-1), 'fsdp_min_bytes'),
])
def test_config_refusals(overrides, match):
  with pytest.raises(UserError, match=match):
    config_check.validate(_config(**overrides))


def test_valid_jit_configs_pass():
  config_check.validate(_config(parallel_backend='jit'))
  config_check.validate(_config(parallel_backend='jit', shard_params='fsdp', fsdp_min_bytes=0))


def test_checksum_is_the_same_for_fsdp_and_replicated_states():
  config = _config(parallel_backend='jit', shard_params='fsdp', fsdp_min_bytes=0, model='mlp', batch_size=32,
                   eval_batch_size=8, num_train_steps=10)
  job = job_lib.build(config, mesh=mesh_lib.make_mesh(8), data=_data())
  canonical = job.initial_state()
  sharded = job.stepper.to_device(canonical)
  assert not sharded.params['Dense_0']['kernel'].sharding.is_fully_replicated
  assert checkpoints.checksum(sharded) == checkpoints.checksum(canonical)
  perturbed = sharded.replace(step=sharded.step + 1)
  assert checkpoints.checksum(perturbed) != checkpoints.checksum(canonical)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_fake_mnist(str(tmp_path_factory.mktemp('data')), num_train=512, num_test=100)


FSDP = ('--config.parallel_backend=jit', '--config.shard_params=fsdp', '--config.fsdp_min_bytes=0')


def _run(workdir, data_dir, devices, steps, *extra):
  proc = harness.run_train(workdir, f'--num_cpu_devices={devices}', f'--config.data_dir={data_dir}',
                           '--config.lr_schedule=constant', f'--config.num_train_steps={steps}', *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _max_diff(a, b):
  assert set(a) == set(b)
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a if a[k].dtype.kind == 'f')


@pytest.mark.slow
def test_checkpoints_resume_between_fsdp_and_replicated_across_device_counts(tmp_path, data_dir):
  """8 FSDP steps on 8 devices, then 4 replicated on 2 (and the reverse) = 12 replicated steps on 4."""
  ref = str(tmp_path / 'ref')
  _run(ref, data_dir, 4, 12)
  a = str(tmp_path / 'fsdp_then_replicated')
  _run(a, data_dir, 8, 8, *FSDP)
  proc = _run(a, data_dir, 2, 12)
  assert 'Restored checkpoint' in proc.stderr
  b = str(tmp_path / 'replicated_then_fsdp')
  _run(b, data_dir, 2, 8)
  proc = _run(b, data_dir, 8, 12, *FSDP)
  assert 'Restored checkpoint' in proc.stderr and 'Train state:' in proc.stderr
  for workdir in (a, b):
    assert harness.checkpoint_steps(workdir)[-1] == 12
    assert _max_diff(harness.load_checkpoint(ref, 12), harness.load_checkpoint(workdir, 12)) < 1e-5
  # The first train event records one device's share of the state: FSDP on 8 devices holds less.
  train = lambda w, after=0: [e for e in harness.metrics(w) if e['kind'] == 'train' and e['step'] > after]
  replicated, fsdp = train(ref)[0]['state_bytes_per_device'], train(b, after=8)[0]['state_bytes_per_device']
  assert fsdp < replicated / 4, (fsdp, replicated)
  assert all('state_bytes_per_device' not in e for e in train(ref)[1:])

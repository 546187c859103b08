"""`steps_per_dispatch`: k train steps in one compiled dispatch give the same training as k single steps, and
every periodic action still runs at exactly its step."""

import signal

import jax
import numpy as np
import pytest

from benchmarks import kit
from input_pipeline import device_feed
from parallel import mesh as mesh_lib
from tests import harness
from tests.conftest import make_fake_mnist
from trainer import hooks, job as job_lib


def _actions(**every):
  return [hooks.Periodic(name, n, lambda step: None) for name, n in every.items()]


def test_dispatch_plan_never_crosses_a_due_step():
  acts = _actions(log=10, eval=8)
  sizes = list(hooks.dispatch_sizes(acts, 0, 25, 3))
  assert sum(sizes) == 25
  ends = np.cumsum(sizes)
  due = {s for s in range(1, 26) if any(a.due(s, 25) for a in acts)}
  assert due <= set(ends.tolist())  # Every due step is the end of a dispatch.
  assert sizes == [3, 3, 1, 1, 1, 1, 3, 3, 3, 1, 3, 1, 1]
  assert list(hooks.dispatch_sizes(acts, 20, 25, 4)) == [4, 1]  # Resumed mid-run: the plan starts there.
  assert list(hooks.dispatch_sizes(_actions(profile=1), 0, 5, 4)) == [1] * 5
  assert list(hooks.dispatch_sizes(acts, 0, 7, 1)) == [1] * 7


def test_regroup_slices_chunks_in_order():
  chunks = [{'x': np.arange(i, i + 4)[:, None]} for i in (0, 4, 8)]  # 12 steps, 4 per element.
  out = list(device_feed._regroup(chunks, [3, 1, 1, 3, 2, 5]))
  assert [size for size, _ in out] == [3, 1, 1, 3, 2]  # The stream ran out before the last group.
  assert out[0][1]['x'][:, 0].tolist() == [0, 1, 2]
  assert out[1][1]['x'].tolist() == [3] and out[2][1]['x'].tolist() == [4]  # Single steps lose the k axis.
  assert out[3][1]['x'][:, 0].tolist() == [5, 6, 7]
  assert out[4][1]['x'][:, 0].tolist() == [8, 9]
  grouped = list(device_feed.grouped(({'x': np.full(2, i)} for i in range(5)), [2, 1, 2]))
  assert [g[1]['x'].shape for g in grouped] == [(2, 2), (2,), (2, 2)]


@pytest.mark.parametrize('backend,model,atol', [('shard_map', 'mlp', 0.0), ('pmap', 'mlp', 0.0),
                                                ('shard_map', 'cnn', 1e-6)])
def test_train_steps_equal_single_steps(backend, model, atol):
  px, lb = kit.arrays(64, (8, 8, 1), seed=0)
  data = kit.dataset(images=px, labels=lb, test=16)
  c = kit.config(small=True, model=model, batch_size=8, parallel_backend=backend)
  job = job_lib.build(c, mesh=mesh_lib.make_mesh(2), data=data)
  batches = [{'image': px[i * 8:(i + 1) * 8].astype(np.float32) / 255, 'label': lb[i * 8:(i + 1) * 8]}
             for i in range(4)]
  one = job.stepper.to_device(job.initial_state())
  losses = []
  for b in batches:
    one, m = job.stepper.train_step(one, job.stepper.place(b))
    losses.append(float(job.stepper.metrics(m)['loss_sum']))
  block = job.stepper.to_device(job.initial_state())
  block, m = job.stepper.train_steps(block, job.stepper.place_steps({k: np.stack([b[k] for b in batches])
                                                                     for k in batches[0]}))
  np.testing.assert_allclose(job.stepper.metrics(m)['loss_sum'], losses, atol=10 * atol, rtol=0)
  a = jax.device_get(job.stepper.to_canonical(one))
  b = jax.device_get(job.stepper.to_canonical(block))
  assert int(a.step) == int(b.step) == 4
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_fake_mnist(str(tmp_path_factory.mktemp('data')), num_train=512, num_test=100)


def _args(data_dir, *extra):  # configs/tiny.py: 8 steps per epoch; 96 steps, eval every epoch, log every 10.
  return ('--num_cpu_devices=4', f'--config.data_dir={data_dir}', '--config.num_epochs=12',
          '--config.log_every_steps=10', '--config.checkpoint_every_steps=1000', *extra)


@pytest.mark.slow
def test_run_with_steps_per_dispatch_equals_single_steps_and_resumes(tmp_path, data_dir):
  """k=3, preempted mid-run and resumed: the same events at the same steps, the same evals and the same final
  state as single steps without a stop."""
  single, term = str(tmp_path / 'single'), str(tmp_path / 'term')
  assert harness.run_train(single, *_args(data_dir)).returncode == 0
  log = str(tmp_path / 'term.log')
  proc = harness.start_train(term, *_args(data_dir, '--config.steps_per_dispatch=3'), log_path=log)
  assert harness.wait_for(lambda: any(e['step'] >= 20 for e in harness.metrics(term)) or proc.poll() is not None)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  stopped = harness.checkpoint_steps(term)
  assert len(stopped) == 1 and stopped[0] < 96, stopped  # The save lands at a dispatch end.
  final = harness.run_train(term, *_args(data_dir, '--config.steps_per_dispatch=3'))
  assert final.returncode == 0 and f'resuming at step {stopped[0]}' in final.stderr, final.stderr[-3000:]
  a, b = harness.metrics(single), harness.metrics(term)
  assert [(e['kind'], e['step']) for e in a] == [(e['kind'], e['step']) for e in b]  # Same events, same steps.
  for x, y in zip(a, b, strict=True):
    if x['kind'] == 'eval':  # (A train event's window after the resume is shorter: its mean differs.)
      for key in ('test_loss', 'test_accuracy'):
        assert abs(x[key] - y[key]) < 1e-5, (x, y)
  harness.assert_states_close(harness.load_checkpoint(single), harness.load_checkpoint(term), atol=1e-5)

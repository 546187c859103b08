"""`train_and_evaluate(config, workdir)`: the whole job, on however many devices and processes exist."""

import collections
import os
import time
from typing import Optional

import jax
from absl import logging

from errors import UserError
from input_pipeline import device_feed, order, pipeline, sources
from parallel import mesh as mesh_lib
from parallel import topology
from parallel.steps import Stepper
from trainer import checkpoints, config_check, plots, reporting
from trainer import state as state_lib
from trainer.preemption import PreemptionWatcher


class Diverged(UserError):
  """The loss became NaN or Inf."""


def _prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'--workdir={workdir} is not writable ({e.strerror}): choose a directory you can write to') \
        from None


class _StepMetrics:
  """Sums train metrics of finished steps; keeps at most `max_in_flight` steps queued on the devices."""

  def __init__(self, stepper: Stepper, max_in_flight: int):
    self._stepper, self._max = stepper, max_in_flight
    self._pending = collections.deque()
    self.reset()

  def reset(self):
    self.loss_sum = self.correct = self.count = 0.0
    self.steps = 0

  def push(self, step: int, metrics) -> None:
    self._pending.append((step, metrics))
    while len(self._pending) > self._max:
      self._collect()

  def drain(self) -> None:
    while self._pending:
      self._collect()

  def _collect(self) -> None:
    step, metrics = self._pending.popleft()
    m = self._stepper.metrics(metrics)  # Blocks on the oldest step: the in-flight bound.
    if not m['finite']:
      raise Diverged(f'the training loss became NaN or Inf at step {step}; the last checkpoint before it is '
                     'intact: lower --config.learning_rate (or use --config.lr_schedule=warmup_cosine) and rerun')
    self.loss_sum += float(m['loss_sum'])
    self.correct += float(m['correct'])
    self.count += float(m['count'])
    self.steps += 1


def evaluate(stepper: Stepper, state, data: sources.InMemoryDataset, config, mesh) -> dict:
  """Exact test metrics: every example counted once, whatever the device/process count."""
  eval_state = stepper.eval_state(stepper.sync_batch_stats(state))
  rows = mesh_lib.process_rows(mesh, config.eval_batch_size)
  ds = pipeline.eval_dataset(data.test_images, data.test_labels, eval_batch=config.eval_batch_size, rows=rows)
  totals = None
  for batch in device_feed.Prefetcher(pipeline.as_numpy(ds), _placer(stepper, mesh, config.eval_batch_size)):
    sums = stepper.eval_step(eval_state, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  count = int(round(float(totals['count'])))
  return {'test_loss': float(totals['loss_sum']) / max(count, 1),
          'test_accuracy': float(totals['correct']) / max(count, 1), 'test_examples': count}


def _placer(stepper: Stepper, mesh, global_batch: int):
  if stepper.backend == 'pmap':
    return lambda batch: mesh_lib.to_pmap_layout(mesh, batch)
  return lambda batch: mesh_lib.to_global(mesh, batch, global_batch)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the final eval metrics."""
  config_check.validate(config)
  reporting.quiet_library_logs()
  is_main = jax.process_index() == 0
  mesh = mesh_lib.make_mesh()
  n_dev = mesh.devices.size
  mesh_lib.check_batch(config.batch_size, n_dev, 'batch_size')
  mesh_lib.check_batch(config.eval_batch_size, n_dev, 'eval_batch_size')
  data = sources.load(config)
  _prepare_workdir(workdir)  # After the data: a failed start leaves no empty workdir behind.
  steps_per_epoch = order.steps_per_epoch(len(data.train_images), config.batch_size)
  if steps_per_epoch == 0:
    raise UserError(f'--config.batch_size={config.batch_size} is larger than the {len(data.train_images)} '
                    'training examples: use a smaller batch')
  total_steps = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch

  model, eval_model = state_lib.make_models(config, data.num_classes)
  tx = state_lib.make_optimizer(config, total_steps)
  stepper = Stepper(mesh, model, eval_model, tx, config.parallel_backend, config.bn_mode)
  state = state_lib.initial_state(mesh, model, tx, data.image_shape, config.seed)
  ckpts = checkpoints.Checkpoints(workdir, config.keep_checkpoints, checkpoints.fingerprint(config, state))
  restored = ckpts.restore_latest(state)
  state = restored if restored is not None else state
  start_step = int(jax.device_get(state.step))

  if is_main:
    logging.info('Topology:\n%s', topology.summary(config.batch_size, config.parallel_backend))
    logging.info('Data: %s (%d train, %d test, %d classes); %d steps/epoch, %d steps total; %s',
                 data.source, len(data.train_images), len(data.test_images), data.num_classes, steps_per_epoch,
                 total_steps, f'resuming at step {start_step}' if restored is not None else 'starting from scratch')
  reporter = reporting.Reporter(workdir, config, is_main, start_step)
  rows = mesh_lib.process_rows(mesh, config.batch_size)
  train_ds = pipeline.train_dataset(data.train_images, data.train_labels, seed=config.seed,
                                    global_batch=config.batch_size, rows=rows, start_step=start_step,
                                    num_steps=total_steps)
  feed = device_feed.Prefetcher(pipeline.as_numpy(train_ds), _placer(stepper, mesh, config.batch_size),
                                config.prefetch_batches)
  state = stepper.to_device(state)
  window = _StepMetrics(stepper, config.max_steps_in_flight)
  speed = reporting.Throughput(start_step, total_steps, config.batch_size)
  preemption = PreemptionWatcher()
  final: Optional[dict] = None

  def save():
    nonlocal state
    window.drain()  # Never checkpoint a state whose loss was not finite.
    state = stepper.sync_batch_stats(state)
    ckpts.save(stepper.to_canonical(state))

  if start_step >= total_steps:
    reporting.log(f'{ckpts.directory} already holds the final step {start_step}: evaluating only.', is_main)
    final = evaluate(stepper, state, data, config, mesh)
    reporting.log(reporting.eval_line({'step': start_step, 'epoch': start_step / steps_per_epoch, **final}), is_main)
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, metrics = stepper.train_step(state, next(feed))
      window.push(step, metrics)
      epoch = step / steps_per_epoch
      if step % config.log_every_steps == 0 or step == total_steps:
        window.drain()
        event = {'kind': 'train', 'step': step, 'epoch': round(epoch, 4),
                 'train_loss': window.loss_sum / max(window.count, 1),
                 'train_accuracy': window.correct / max(window.count, 1), **speed.window(step, feed.wait_s)}
        reporter.write(event)
        reporting.log(reporting.train_line(event, total_steps), is_main)
        window.reset()
      t_aside = time.perf_counter()
      if step % eval_every == 0 or step == total_steps:
        window.drain()
        state = stepper.sync_batch_stats(state)
        final = {'kind': 'eval', 'step': step, 'epoch': round(epoch, 4),
                 **evaluate(stepper, state, data, config, mesh)}
        reporter.write(final)
        reporting.log(reporting.eval_line(final), is_main)
      if step % config.checkpoint_every_steps == 0 or step == total_steps:
        save()
      speed.exclude(time.perf_counter() - t_aside)
      if step < total_steps and preemption.reached(step):
        save()
        ckpts.wait()
        reporting.log(f'Preempted (SIGTERM): saved a checkpoint at step {step} of {total_steps} in '
                      f'{ckpts.directory}; run the same command to resume.', is_main)
        print(f'Preempted: checkpoint saved at step {step}/{total_steps}; rerun the same command to resume.',
              flush=True)
        return {'preempted_at': step}
  finally:
    feed.close()
    ckpts.close()
    reporter.close()
    preemption.close()
  if is_main and config.plot and final is not None:
    logging.info('Learning curves: %s', plots.plot_learning_curves(workdir))
  return final or {}

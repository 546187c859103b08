"""`train_and_evaluate(config, workdir)`: build the job, then run it (resuming from the workdir)."""

import collections
import itertools
from collections.abc import Callable

import jax
from absl import logging

import paths
from errors import UserError, setting
from input_pipeline import sources
from parallel import agreement, sharding, topology
from trainer import (
  checkpoints,
  hooks,
  job as job_lib,
  optim,
  plots,
  preemption as preemption_lib,
  reporting,
  utilization,
  workdir as workdir_lib,
)
from trainer.profiling import Profiler

# A step whose mean loss exceeds this factor x max(first step's loss, 1) has diverged, finite or not. Cross-
# entropy starts near ln(classes) and a healthy run stays within a small multiple of that; 1e6x leaves every
# legitimate spike far below (README, "Divergence").
DIVERGENCE_FACTOR = 1e6
# Finished steps' metrics are fetched in one transfer at each log, eval or save, or every this many dispatches.
FETCH_EVERY = 256


class Diverged(UserError):
  """The loss (or the state) became NaN or Inf, or the loss grew without bound."""


def diverged(what: str, last_checkpoint: str) -> Diverged:
  return Diverged(f'{what}; {last_checkpoint}: lower {setting("learning_rate")} (or use '
                  f'{setting("lr_schedule")}=warmup_cosine) and rerun')


class _StepMetrics:
  """Sums train metrics of finished steps; keeps at most `max_in_flight` steps queued on the devices.

  The bound only waits for the oldest step (`block_until_ready`); the metric values stay on the devices
  until `drain()` (at a log, eval or save) fetches all of them in one `device_get`. One transfer per window
  instead of one per step is most of the host time a tiny model's step spends here
  (benchmarks/host_overhead.py). A NaN or a diverged loss is still reported with its own step.
  `last_checkpoint()` says which checkpoint survives a divergence (for the error line).
  """

  def __init__(self, stepper, max_in_flight: int, last_checkpoint: Callable[[], str]):
    self._stepper, self._max, self._last_checkpoint = stepper, max_in_flight, last_checkpoint
    self._in_flight = collections.deque()
    self._finished = []
    self.first_loss = None
    self.reset()

  def reset(self):
    self.loss_sum = self.correct = self.count = 0.0

  def push(self, step, metrics) -> None:
    """`step`: an int, or a range of steps whose metrics come stacked from one `train_steps` dispatch. The
    bound counts dispatches."""
    self._in_flight.append((step, metrics))
    while len(self._in_flight) > self._max:
      item = self._in_flight.popleft()
      jax.block_until_ready(item[1])  # The in-flight bound.
      self._finished.append(item)
    if len(self._finished) >= FETCH_EVERY:  # Long log intervals: keep few metric arrays alive.
      finished, self._finished = self._finished, []
      self._fetch(finished)

  def drain(self) -> None:
    pending = self._finished + list(self._in_flight)
    self._finished, self._in_flight = [], collections.deque()
    self._fetch(pending)

  def _fetch(self, pending) -> None:
    if not pending:
      return
    values = self._stepper.metrics([m for _, m in pending])  # One transfer for many steps.
    for (step, _), m in zip(pending, values, strict=True):
      if isinstance(step, range):
        for j, one in enumerate(step):
          self._add(one, {name: value[j] for name, value in m.items()})
      else:
        self._add(step, m)

  def _add(self, step: int, m) -> None:
    if not m['finite']:
      raise diverged(f'the training loss became NaN or Inf at step {step}', self._last_checkpoint())
    loss = float(m['loss_sum']) / max(float(m['count']), 1.0)
    if self.first_loss is None:
      self.first_loss = loss
    elif loss > DIVERGENCE_FACTOR * max(self.first_loss, 1.0):
      raise diverged(f'the training loss grew to {loss:.3g} at step {step}, over {DIVERGENCE_FACTOR:.0e} x its '
                     f'first value {self.first_loss:.3g}: the run diverged', self._last_checkpoint())
    self.loss_sum += float(m['loss_sum'])
    self.correct += float(m['correct'])
    self.count += float(m['count'])


def evaluate(job: job_lib.Job, state) -> dict:
  """Exact test metrics: every example counted once, whatever the device/process count."""
  stepper = job.stepper
  eval_state = stepper.eval_state(stepper.sync_batch_stats(state))
  totals = None
  feed = job.eval_feed()
  try:
    for batch in feed:
      sums = stepper.eval_step(eval_state, batch)
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  finally:
    feed.close()
  count = int(round(float(totals['count'])))
  out = {'test_loss': float(totals['loss_sum']) / max(count, 1),
         'test_accuracy': float(totals['correct']) / max(count, 1), 'test_examples': count}
  if 'correct_top5' in totals:  # Datasets with more than 5 classes.
    out['test_top5_accuracy'] = float(totals['correct_top5']) / max(count, 1)
  return out


class Trainer:
  """One run of a job in a workdir: restore, then steps with periodic actions, until the end or SIGTERM."""

  def __init__(self, job: job_lib.Job, workdir: str):
    self.job, self.config, self.workdir = job, job.config, workdir
    self.is_main = jax.process_index() == 0
    state = job.initial_state()
    fp = checkpoints.fingerprint(self.config, state, job.data.identity())
    self.ckpts = checkpoints.Checkpoints(workdir, self.config.keep_checkpoints, fp)
    # Decide, restore, then write: a refused start leaves config.json, its history and the checkpoints as they were.
    start = workdir_lib.decide(workdir, self.config, self.ckpts.newest_meta, fp, checkpoints.compare)
    # Read before start.record rewrites config.json.
    resuming = self.is_main and self.ckpts.latest_step() is not None
    saved_schedule = optim.saved_schedule_config(workdir) if resuming else None
    restored = self.ckpts.restore_latest(state)
    self.resumed = restored is not None
    state = restored if self.resumed else state
    self.start_step = int(jax.device_get(state.step))  # From the canonical state: pmap's has one per device.
    self.state = job.stepper.to_device(state)
    start.record(self.start_step if self.resumed else None)
    if self.resumed:
      optim.log_schedule_change(saved_schedule, self.config, job.steps_per_epoch, job.total_steps, self.start_step)
    self.reporter = reporting.Reporter(workdir, self.is_main, self.start_step)
    self.window = _StepMetrics(job.stepper, self.config.max_steps_in_flight, self.last_checkpoint)
    self.speed = reporting.Throughput(self.start_step, job.total_steps, self.config.batch_size)
    self.final: dict | None = None
    self.feed = None
    self.phase: str | None = None  # What runs besides train steps (an eval, a save), for a lost-peer line.
    c = self.config
    self.utilization = utilization.Utilization(job)
    self.profiler = Profiler(workdir, c.profile_steps, self.start_step, job.total_steps)
    self.last_train: dict | None = None
    # The periodic actions, in the order they run at a step; a new one is one line here (or, from a config,
    # an entry of `config.hooks`).
    self.actions = [
        hooks.Periodic('log', c.log_every_steps, self.log, aside=False),
        hooks.Periodic('eval', job.eval_every, self.eval),
        hooks.Periodic('checkpoint', c.checkpoint_every_steps, self.save),
    ] + ([hooks.Periodic('profile', 1, lambda step: self.profiler.step(step, self.state), aside=False)]
         if c.profile_steps > 0 else []) + hooks.from_config(c, self._step_info)

  def _step_info(self, name: str, step: int) -> hooks.StepInfo:
    stepper = self.job.stepper
    state = lambda: stepper.to_canonical(stepper.sync_batch_stats(self.state))  # A copy: training is unchanged.
    return hooks.StepInfo(name, step, self._epoch(step), self.workdir, self.config, self.is_main, self.last_train,
                          self.final, state, self.reporter.write)

  def _epoch(self, step: int) -> float:
    return round(step / self.job.steps_per_epoch, 4)

  # --- periodic actions ------------------------------------------------------------------------------------
  def log(self, step: int) -> None:
    self.window.drain()
    w = self.window
    event = {'kind': 'train', 'step': step, 'epoch': self._epoch(step), 'train_loss': w.loss_sum / max(w.count, 1),
             'train_accuracy': w.correct / max(w.count, 1), **self.speed.window(step, self.feed.wait_s)}
    event.update(self.utilization.window(event['images_per_sec'], self.state))
    self.reporter.write(event)
    self.last_train = event
    reporting.log(reporting.train_line(event, self.job.total_steps), self.is_main)
    w.reset()

  def eval(self, step: int) -> None:
    self.window.drain()
    self.state = self.job.stepper.sync_batch_stats(self.state)
    self.phase = f'the evaluation at step {step}'
    self.final = {'kind': 'eval', 'step': step, 'epoch': self._epoch(step), **evaluate(self.job, self.state)}
    self.phase = None
    self.reporter.write(self.final)
    reporting.log(reporting.eval_line(self.final), self.is_main)

  def save(self, step: int) -> None:
    self.window.drain()  # Never checkpoint a state whose loss was not finite.
    self.state = self.job.stepper.sync_batch_stats(self.state)
    self.phase = f'saving checkpoint {step}'
    try:
      self.ckpts.save(self.job.stepper.to_canonical(self.state))
      self.phase = None
    except checkpoints.NotFinite:
      raise diverged(f'the parameters or optimizer state became NaN or Inf at step {step} (its loss was still '
                     'finite), so it was not saved', self.last_checkpoint()) from None

  def last_checkpoint(self) -> str:
    """Which checkpoint a failed run leaves to resume from, for error lines."""
    step = self.ckpts.latest_step()
    if step is None:
      return 'no checkpoint was written yet, so a rerun starts from scratch'
    return f'the last checkpoint (step {step} in {self.ckpts.directory}) holds finite values'

  # --- the run ---------------------------------------------------------------------------------------------
  def log_start(self) -> None:
    job, data = self.job, self.job.data
    if not self.is_main:
      return
    logging.info('Workdir: %s', paths.resolve_path(self.workdir))
    logging.info('Topology:\n%s', topology.summary(self.config.batch_size, self.config.parallel_backend))
    logging.info('Data: %s (%d train, %d eval, %d classes; %s); %d steps/epoch, %d steps total; %s',
                 data.description, data.num_examples('train'), data.num_examples('eval'), data.num_classes,
                 job.prep.describe(), job.steps_per_epoch, job.total_steps,
                 f'resuming at step {self.start_step}' if self.resumed else 'starting from scratch')
    logging.info('Train state: %.1f MiB per device (shard_params=%s)',
                 sharding.bytes_per_device(self.state) / 2**20, self.config.shard_params)

  def run(self) -> dict:
    job, total = self.job, self.job.total_steps
    self.log_start()
    if self.config.eval_only:
      return self.eval_only()
    if self.start_step >= total:
      reporting.log(f'{self.ckpts.directory} already holds the final step {self.start_step}: evaluating only.',
                    self.is_main)
      self.final = {'step': self.start_step, 'epoch': self._epoch(self.start_step), **evaluate(job, self.state)}
      reporting.log(reporting.eval_line(self.final), self.is_main)
    preemption = preemption_lib.PreemptionWatcher()
    poll = jax.process_count() == 1  # Multi-process: failed saves surface at the next save, on every process.
    k = self.config.steps_per_dispatch
    plan = lambda: hooks.dispatch_sizes(self.actions, self.start_step, total, k)
    self.feed = job.train_feed(self.start_step, sizes=plan() if k > 1 else None)
    step = self.start_step
    try:
      for size in (plan() if k > 1 else itertools.repeat(1, total - self.start_step)):
        if size == 1:
          self.state, metrics = job.stepper.train_step(self.state, next(self.feed))
          self.window.push(step + 1, metrics)
        else:
          self.state, metrics = job.stepper.train_steps(self.state, next(self.feed))
          self.window.push(range(step + 1, step + size + 1), metrics)
        step += size
        self.speed.exclude(hooks.run_due(self.actions, step, total))
        if poll:
          self.ckpts.poll()
        if step < total and preemption.reached(step):
          self.save(step)
          self._close(preemption)
          return self._preempted(step)
    except BaseException as e:
      self._close(preemption, failing=True)
      if not isinstance(e, UserError) and agreement.peer_error(e):  # Not a traceback, not this host's fault.
        raise agreement.lost_contact(self.phase or f'training step {step + 1}', e) from None
      raise
    self._close(preemption)
    if self.is_main and self.config.plot and self.final is not None:
      if plots.available():
        logging.info('Learning curves: %s', plots.plot_learning_curves(self.workdir))
      else:
        logging.warning('Learning curves are off: matplotlib is not installed (%s=False silences this).',
                        setting('plot'))
    if preemption_lib.received():
      preemption_lib.say(f'{preemption_lib.received()} after the last step: the run is complete and saved.')
    return self.final or {}

  def eval_only(self) -> dict:
    """`--config.eval_only`: one eval event for the newest checkpoint; nothing trained or saved."""
    try:
      if not self.resumed:
        raise UserError(f'{setting("eval_only")} needs a checkpoint, but {self.ckpts.directory} holds none: '
                        'train first (drop --config.eval_only), or point --workdir at a trained run')
      self.final = {'kind': 'eval', 'step': self.start_step, 'epoch': self._epoch(self.start_step),
                    'eval_only': True, 'data_source': self.config.data_source, 'data_dir': self.config.data_dir,
                    'data': self.job.data.description, **evaluate(self.job, self.state)}
      self.reporter.write(self.final)
      reporting.log(reporting.eval_line(self.final), self.is_main)
      return self.final
    finally:
      self.ckpts.close()
      self.reporter.close()

  def _close(self, preemption, failing: bool = False) -> None:
    """Stops the feed, settles the last save and closes the writers; while failing, a second error from
    closing is logged rather than hiding the first."""
    preemption.close()
    for close in (self.feed.close, self.profiler.close, self.ckpts.close, self.reporter.close):
      try:
        close()
      except Exception as e:
        if not failing:
          raise
        logging.warning('While stopping after an error: %s', e)

  def _preempted(self, step: int) -> dict:
    total, name = self.job.total_steps, preemption_lib.received() or 'SIGTERM'
    reporting.log(f'Preempted ({name}): saved a checkpoint at step {step} of {total} in {self.ckpts.directory}; '
                  'run the same command to resume.', self.is_main)
    preemption_lib.say(f'Preempted: checkpoint saved at step {step}/{total}; rerun the same command to resume.')
    return {'preempted_at': step}


def train_and_evaluate(config, workdir: str, agree_timeout_s: int = 120) -> dict:
  """Trains `config` (validated by `trainer.config_check`, as train.py does) in `workdir`, resuming from its
  latest checkpoint; returns the final eval metrics. The processes of a multi-process job first agree on the
  config, then on the data (each waits up to `agree_timeout_s` for its peers): before any compile or file."""
  reporting.quiet_library_logs()
  agreement.agree('config', agreement.config_record(config), agreement.config_difference, agree_timeout_s)
  data = sources.load(config)
  agreement.agree('data', agreement.data_record(data), agreement.data_difference, agree_timeout_s)
  job = job_lib.build(config, data=data)
  if job.data.num_examples('eval') == 0:  # Here, not after all the training, at the first eval.
    raise UserError(f'the test split of {job.data.description} is empty: evaluation needs test examples; point '
                    f'{setting("data_dir")} at a complete dataset')
  workdir_lib.prepare(workdir)  # After the data: a failed start leaves no empty workdir behind.
  workdir_lib.lock(workdir, lease_s=config.get('workdir_lease_s', 60))
  return Trainer(job, workdir).run()

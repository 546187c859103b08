"""`build(config) -> Job`: everything a run needs, set up once.

The train loop, the throughput benchmark and the parallel tests all build their job here, so a feature
added to the job (a model, an optimizer option, a data source) is trained, measured and tested alike.
"""

import dataclasses
from typing import Any, Iterable, Optional

import optax
from jax import lax

from errors import UserError, setting
from input_pipeline import augment, device_feed, order, pipeline, sources
import models.conv
import models.norm
from models import create_model
from parallel import mesh as mesh_lib
from parallel import steps
from trainer import optim
from trainer import state as state_lib


@dataclasses.dataclass
class Job:
  """A config resolved against a mesh and a dataset: models, optimizer, compiled steps, stream lengths."""
  config: Any
  mesh: Any
  data: sources.Source
  prep: augment.Preprocess
  model: Any
  eval_model: Any
  tx: optax.GradientTransformation
  stepper: steps.Stepper
  steps_per_epoch: int
  total_steps: int
  eval_every: int

  def initial_state(self) -> state_lib.TrainState:
    """The canonical (replicated) initial state: the same for every topology."""
    return state_lib.initial_state(self.mesh, self.model, self.tx, self.prep.output_shape, self.config.seed,
                                    ema=self.config.ema_decay > 0)

  def flops_stepper(self) -> steps.Stepper:
    """A stepper of the same math for XLA's cost analysis: with `conv_impl`'s chunked kernel gradients (a
    `lax.scan`) XLA counts a loop body once, not once per trip, so FLOPs are counted on XLA's convolutions
    (and on flax's BatchNorm, so that `bn_impl` does not change the model's count)."""
    if (models.conv.conv_for(self.config.conv_impl) is lax.conv_general_dilated
        and models.norm.resolve(self.config.bn_impl) == 'flax' and not self.config.deterministic):
      return self.stepper
    c = self.config.copy_and_resolve_references()
    c.conv_impl, c.bn_impl = 'xla', 'flax'
    c.deterministic = False  # Its per-slice loops too would be counted once.
    model = create_model(c, num_classes=self.data.num_classes, bn_axis_name=steps.train_bn_axis(c))
    eval_model = create_model(c, num_classes=self.data.num_classes, bn_axis_name=None)
    return steps.make_stepper(c, self.mesh, model, eval_model, self.tx)

  def train_feed(self, start_step: int, num_steps: Optional[int] = None,
                 sizes: Optional[Iterable[int]] = None) -> device_feed.Prefetcher:
    """Placed train batches `start_step .. num_steps-1` (default: to the end of the run), this process's rows.

    With `sizes` (the loop's dispatch plan, `hooks.dispatch_sizes`) it yields one item per dispatch: a batch
    placed for `train_step` where the size is 1, else that many steps stacked and placed for `train_steps`.
    """
    c = self.config
    rows = mesh_lib.process_rows(self.mesh, c.batch_size)
    ds = pipeline.train_dataset(self.data, self.prep, seed=c.seed, global_batch=c.batch_size, rows=rows,
                                start_step=start_step, num_steps=self.total_steps if num_steps is None else num_steps,
                                threads=c.data_threads)

    def explain(k, error):
      step = start_step + k  # 0-based position in the stream; the loop calls it step + 1.
      n = self.data.num_examples('train')
      indices = order.epoch_batches(c.seed, step // self.steps_per_epoch, n, c.batch_size)[
          step % self.steps_per_epoch, rows[0]:rows[1]]
      return pipeline.bad_data_error(self.data, self.prep, 'train', indices, error, f'at training step {step + 1}',
                                     seed=c.seed, step=step)

    return self._feed(ds, explain, sizes)

  def eval_feed(self) -> device_feed.Prefetcher:
    """Placed eval batches: every eval example once, the last batch padded and masked."""
    c = self.config
    rows = mesh_lib.process_rows(self.mesh, c.eval_batch_size)
    ds = pipeline.eval_dataset(self.data, self.prep, eval_batch=c.eval_batch_size, rows=rows, threads=c.data_threads)

    def explain(k, error):
      idx, _ = order.eval_batches(self.data.num_examples('eval'), c.eval_batch_size)
      return pipeline.bad_data_error(self.data, self.prep, 'eval', idx[k, rows[0]:rows[1]], error,
                                     f'during evaluation (eval batch {k + 1})')

    return self._feed(ds, explain)


  def _feed(self, ds, explain, sizes=None) -> device_feed.Prefetcher:
    """In-memory arrays (nothing to decode) go several steps per tf.data element; decoded sources one batch
    per element, so that a failing file is found in the batch whose step the error names."""
    depth, stepper = self.config.prefetch_batches, self.stepper
    put = stepper.place
    if sizes is not None:
      put = lambda item: stepper.place(item[1]) if item[0] == 1 else stepper.place_steps(item[1])
    if pipeline.whole_batches(self.data, self.prep):
      return device_feed.from_dataset(ds, put, depth, sizes)
    batches = pipeline.checked(pipeline.as_numpy(ds), explain)
    return device_feed.Prefetcher(batches if sizes is None else device_feed.grouped(batches, sizes), put, depth)


def model_config(config):
  """The config the models are built from: `deterministic` resolves conv_impl and bn_impl `auto` to XLA's
  convolution and flax's BatchNorm (whose modules `parallel/deterministic.py` runs in fixed order);
  config_check refuses the other kernels there."""
  if not config.deterministic:
    return config
  c = config.copy_and_resolve_references()
  c.conv_impl, c.bn_impl = 'xla', 'flax'
  return c


def build(config, *, mesh=None, data: Optional[sources.Source] = None) -> Job:
  """Resolves `config` (validated by `trainer.config_check`) on `mesh` (default: every device) and `data`
  (default: `config.dataset` from `config.data_source`)."""
  mesh = mesh if mesh is not None else mesh_lib.make_mesh()
  n_dev = mesh.devices.size
  mesh_lib.check_batch(config.batch_size, n_dev, 'batch_size')
  mesh_lib.check_batch(config.eval_batch_size, n_dev, 'eval_batch_size')
  if config.deterministic and config.virtual_shards % n_dev:
    v = config.virtual_shards
    raise UserError(f'{setting("deterministic")}=True splits every batch into {setting("virtual_shards")}={v} '
                    f'slices, which do not split over {n_dev} devices: use a device count that divides {v} '
                    f'({", ".join(str(d) for d in range(1, v + 1) if v % d == 0)}), or a new run with virtual_shards '
                    f'a multiple of {n_dev}')
  accum = config.grad_accum_steps
  if (config.batch_size // n_dev) % accum:
    raise UserError(f'{setting("batch_size")}={config.batch_size} does not split into {setting("grad_accum_steps")}'
                    f'={accum} micro-batches on each of {n_dev} devices: use a multiple of {accum * n_dev}')
  data = data if data is not None else sources.load(config)
  sources.check_classes(data)
  prep = augment.Preprocess.from_config(config, data)
  num_train = data.num_examples('train')
  steps_per_epoch = order.steps_per_epoch(num_train, config.batch_size)
  if steps_per_epoch == 0:
    raise UserError(f'{setting("batch_size")}={config.batch_size} is larger than the {num_train} '
                    'training examples: use a smaller batch')
  total_steps = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  net = model_config(config)
  model = create_model(net, num_classes=data.num_classes, bn_axis_name=steps.train_bn_axis(config))
  eval_model = create_model(net, num_classes=data.num_classes, bn_axis_name=None)
  tx = optim.make_optimizer(config, total_steps)
  stepper = steps.make_stepper(config, mesh, model, eval_model, tx)
  return Job(config, mesh, data, prep, model, eval_model, tx, stepper, steps_per_epoch, total_steps, eval_every)

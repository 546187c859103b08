"""`build(config) -> Job`: everything a run needs, set up once.

The train loop, the throughput benchmark and the parallel tests all build their job here, so a feature
added to the job (a model, an optimizer option, a data source) is trained, measured and tested alike.
"""

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import optax

import cpu_kernels
import plugins
from errors import UserError, setting
from input_pipeline import augment, device_feed, order, sources
from models import create_model, external
from models.vit import SIZES as VIT_MODELS
from parallel import mesh as mesh_lib, state as state_lib, steps
from trainer import optim


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
    state = state_lib.initial_state(self.mesh, self.model, self.tx, self.prep.output_shape, self.config.seed,
                                    ema=self.config.ema_decay > 0)
    _check_batch_norm(self.config, state)
    return state

  def flops_stepper(self) -> steps.Stepper:
    """A stepper of the same math for XLA's cost analysis: with cpu_kernels' chunked kernel gradients (a
    `lax.scan`) or deterministic mode's per-slice loops, XLA counts a loop body once, not once per trip, so FLOPs
    are counted on the plain model in the default order (which also keeps the hand-written BatchNorm from
    changing the model's count)."""
    if not isinstance(self.model, cpu_kernels.Plugged) and not self.config.deterministic:
      return self.stepper
    c = self.config.copy_and_resolve_references()
    c.cpu_kernels, c.deterministic = 'off', False
    model = create_model(c, num_classes=self.data.num_classes, bn_axis_name=steps.train_bn_axis(c))
    eval_model = create_model(c, num_classes=self.data.num_classes, bn_axis_name=None)
    return steps.make_stepper(c, self.mesh, model, eval_model, self.tx)

  def train_feed(self, start_step: int, num_steps: int | None = None,
                 sizes: Iterable[int] | None = None) -> device_feed.Prefetcher:
    """Placed train batches `start_step .. num_steps-1` (default: to the end of the run), this process's rows.

    With `sizes` (the loop's dispatch plan, `hooks.dispatch_sizes`) it yields one item per dispatch: a batch
    placed for `train_step` where the size is 1, else that many steps stacked and placed for `train_steps`.
    """
    c = self.config
    rows = mesh_lib.process_rows(self.mesh, c.batch_size)
    end = self.total_steps if num_steps is None else num_steps
    if getattr(self.data, 'on_device', False):
      from input_pipeline import synthetic
      return self._generated('train', synthetic.index_batches(self.data.num_examples('train'), c.seed, c.batch_size,
                                                              rows, start_step, end), rows[1] - rows[0], sizes)
    from input_pipeline import pipeline  # tf.data: TensorFlow loads here, not for synthetic data.
    k = device_feed.steps_for_bytes((rows[1] - rows[0]) * (4 * int(np.prod(self.prep.output_shape)) + 4))
    ds = pipeline.train_dataset(self.data, self.prep, seed=c.seed, global_batch=c.batch_size, rows=rows,
                                start_step=start_step, num_steps=end, threads=c.data_threads, steps_per_element=k)

    def explain(k, error):
      step = start_step + k  # 0-based position in the stream; the loop calls it step + 1.
      n = self.data.num_examples('train')
      indices = order.epoch_batches(c.seed, step // self.steps_per_epoch, n, c.batch_size)[
          step % self.steps_per_epoch, rows[0]:rows[1]]
      return pipeline.bad_data_error(self.data, self.prep, 'train', indices, error, f'at training step {step + 1}',
                                     seed=c.seed, step=step)

    return self._feed(ds, explain, sizes, stacked=k > 1)

  def eval_feed(self) -> device_feed.Prefetcher:
    """Placed eval batches: every eval example once, the last batch padded and masked."""
    c = self.config
    rows = mesh_lib.process_rows(self.mesh, c.eval_batch_size)
    if getattr(self.data, 'on_device', False):
      idx, mask = order.eval_batches(self.data.num_examples('eval'), c.eval_batch_size)
      return self._generated('eval', ({'index': i[rows[0]:rows[1]], 'mask': m[rows[0]:rows[1]].astype('float32')}
                                      for i, m in zip(idx, mask, strict=True)), rows[1] - rows[0])
    from input_pipeline import pipeline
    ds = pipeline.eval_dataset(self.data, self.prep, eval_batch=c.eval_batch_size, rows=rows, threads=c.data_threads)

    def explain(k, error):
      idx, _ = order.eval_batches(self.data.num_examples('eval'), c.eval_batch_size)
      return pipeline.bad_data_error(self.data, self.prep, 'eval', idx[k, rows[0]:rows[1]], error,
                                     f'during evaluation (eval batch {k + 1})')

    return self._feed(ds, explain)

  def _generated(self, split, batches, rows: int, sizes=None) -> device_feed.Prefetcher:
    """Synthetic data: host index batches placed like any batch, then turned into examples on the devices."""
    stepper, make = self.stepper, lambda placed: self.data.generate(split, placed)
    put = lambda batch: make(stepper.place(batch))
    if sizes is not None:
      batches = device_feed.grouped(batches, sizes)
      put = lambda item: make(stepper.place(item[1]) if item[0] == 1 else stepper.place_steps(item[1]))
      return device_feed.Prefetcher(batches, put, self.config.prefetch_batches)
    # Generated bytes per step of this process (images, labels, indices, an eval mask): small batches go up to
    # `device_feed.MAX_CHUNK` steps per transfer and per generating dispatch, as in-memory data does.
    k = device_feed.steps_for_bytes(rows * (4 * int(np.prod(self.data.image_shape)) + 12))
    if k == 1:
      return device_feed.Prefetcher(batches, put, self.config.prefetch_batches)
    each = lambda chunk: stepper.split_steps(make(stepper.place_steps(chunk)), len(chunk['index']))
    return device_feed.Prefetcher(device_feed.stacked(batches, k), device_feed.padded_each(each), 1, each=True)

  def _feed(self, ds, explain, sizes=None, stacked=False) -> device_feed.Prefetcher:
    """In-memory arrays (nothing to decode) go several steps per tf.data element; decoded sources one batch
    per element, so that a failing file is found in the batch whose step the error names."""
    depth, stepper = self.config.prefetch_batches, self.stepper
    from input_pipeline import pipeline
    put = stepper.place
    if sizes is not None:
      put = lambda item: stepper.place(item[1]) if item[0] == 1 else stepper.place_steps(item[1])
    if pipeline.whole_batches(self.data, self.prep):
      return device_feed.from_dataset(ds, put, depth, sizes, put_each=stepper.place_each, stacked=stacked)
    batches = pipeline.checked(pipeline.as_numpy(ds), explain)
    return device_feed.Prefetcher(batches if sizes is None else device_feed.grouped(batches, sizes), put, depth)


def _check_patch_size(config, image_shape) -> None:
  """The ViTs cut images into `patch_size` squares: say so before the model is traced."""
  p = config.patch_size
  if config.model in VIT_MODELS and (image_shape[0] % p or image_shape[1] % p):
    raise UserError(f'{setting("patch_size")}={p} does not divide the {image_shape[0]}x{image_shape[1]} images: '
                    'use a divisor of the image size (e.g. 4 for 28 or 32 px, 16 for 224 px)')


def _check_batch_norm(config, state) -> None:
  """A MODULE:ATTR model with BatchNorm but no axis keyword would keep per-device statistics under the
  per-device backends while `bn_mode=global` promises global ones (and replicated `batch_stats`): refuse."""
  c = config
  if (plugins.is_path(c.model) and jax.tree.leaves(state.batch_stats) and steps.train_bn_axis(c) is not None
      and not external.takes_axis_name(c)):
    raise UserError(f'{setting("model")}={c.model!r} has BatchNorm but takes no bn_axis_name (or axis_name) '
                    f'keyword, so under {setting("parallel_backend")}={c.parallel_backend} its statistics would be '
                    'per device: add `bn_axis_name: Optional[str] = None` and pass it to nn.BatchNorm(axis_name=...), '
                    f'or use {setting("parallel_backend")}=jit (global statistics) or {setting("bn_mode")}=local')


def model_config(config):
  """The config the models are built from: `deterministic` turns `cpu_kernels` off, so that the models' plain
  nn.Conv and nn.BatchNorm are what `parallel/deterministic.py` runs in fixed order."""
  if not config.deterministic:
    return config
  c = config.copy_and_resolve_references()
  c.cpu_kernels = 'off'
  return c


def build(config, *, mesh=None, data: sources.Source | None = None) -> Job:
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
  if getattr(data, 'on_device', False):  # Made at their final size: nothing to resize, augment or normalise.
    prep = augment.Preprocess(channels=data.channels, native_shape=data.image_shape)
  else:
    prep = augment.Preprocess.from_config(config, data)
  _check_patch_size(config, prep.output_shape)
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

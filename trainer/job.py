"""`build(config) -> Job`: everything a run needs, set up once.

The train loop, the throughput benchmark and the parallel tests all build their job here, so a feature
added to the job (a model, an optimizer option, a data source) is trained, measured and tested alike.
"""

import dataclasses
from typing import Any, Optional

import optax

from errors import UserError, setting
from input_pipeline import device_feed, order, pipeline, sources
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
  data: sources.InMemoryDataset
  model: Any
  eval_model: Any
  tx: optax.GradientTransformation
  stepper: steps.Stepper
  steps_per_epoch: int
  total_steps: int
  eval_every: int

  def initial_state(self) -> state_lib.TrainState:
    """The canonical (replicated) initial state: the same for every topology."""
    return state_lib.initial_state(self.mesh, self.model, self.tx, self.data.image_shape, self.config.seed,
                                    ema=self.config.ema_decay > 0)

  def train_feed(self, start_step: int, num_steps: Optional[int] = None) -> device_feed.Prefetcher:
    """Placed train batches `start_step .. num_steps-1` (default: to the end of the run), this process's rows."""
    c = self.config
    ds = pipeline.train_dataset(self.data.train_images, self.data.train_labels, seed=c.seed, global_batch=c.batch_size,
                                rows=mesh_lib.process_rows(self.mesh, c.batch_size), start_step=start_step,
                                num_steps=self.total_steps if num_steps is None else num_steps)
    return device_feed.Prefetcher(pipeline.as_numpy(ds), self.stepper.place, c.prefetch_batches)

  def eval_feed(self) -> device_feed.Prefetcher:
    """Placed eval batches: every test example once, the last batch padded and masked."""
    c = self.config
    ds = pipeline.eval_dataset(self.data.test_images, self.data.test_labels, eval_batch=c.eval_batch_size,
                               rows=mesh_lib.process_rows(self.mesh, c.eval_batch_size))
    return device_feed.Prefetcher(pipeline.as_numpy(ds), self.stepper.place, c.prefetch_batches)


def build(config, *, mesh=None, data: Optional[sources.InMemoryDataset] = None) -> Job:
  """Resolves `config` (validated by `trainer.config_check`) on `mesh` (default: every device) and `data`
  (default: `config.dataset` from `config.data_source`)."""
  mesh = mesh if mesh is not None else mesh_lib.make_mesh()
  n_dev = mesh.devices.size
  mesh_lib.check_batch(config.batch_size, n_dev, 'batch_size')
  mesh_lib.check_batch(config.eval_batch_size, n_dev, 'eval_batch_size')
  accum = config.grad_accum_steps
  if (config.batch_size // n_dev) % accum:
    raise UserError(f'{setting("batch_size")}={config.batch_size} does not split into {setting("grad_accum_steps")}'
                    f'={accum} micro-batches on each of {n_dev} devices: use a multiple of {accum * n_dev}')
  data = data if data is not None else sources.load(config)
  steps_per_epoch = order.steps_per_epoch(len(data.train_images), config.batch_size)
  if steps_per_epoch == 0:
    raise UserError(f'{setting("batch_size")}={config.batch_size} is larger than the {len(data.train_images)} '
                    'training examples: use a smaller batch')
  total_steps = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  model = create_model(config, num_classes=data.num_classes, bn_axis_name=steps.BN_MODES[config.bn_mode])
  eval_model = create_model(config, num_classes=data.num_classes, bn_axis_name=None)
  tx = optim.make_optimizer(config, total_steps)
  stepper = steps.make_stepper(config, mesh, model, eval_model, tx)
  return Job(config, mesh, data, model, eval_model, tx, stepper, steps_per_epoch, total_steps, eval_every)

"""One step math, run per device under `jax.shard_map` (default) or `jax.pmap`, or globally under `jax.jit`.

The body sees one device's slice of the batch. It averages gradients over the `data` axis with an explicit
`lax.pmean`, which is only correct with `check_vma=False` under shard_map (with the default `True`,
gradients of replicated params arrive already summed over devices). pmap has the same semantics, so one
body serves both backends, and the tests compare them.

BatchNorm (`bn_mode`):
  - `global`: the model's BatchNorm reduces over the `data` axis: statistics of the whole global batch,
    identical `batch_stats` everywhere (replicated).
  - `local`: per-device statistics; `batch_stats` carry a device axis and are averaged by `sync_batch_stats`
    before every eval and checkpoint (the classic recipe).

The `jit` backend runs the same body on the global batch (`GLOBAL`: its reductions are plain means and sums,
and the partitioner inserts the collectives); its models' BatchNorm has no `axis_name`, as a mean over the
sharded global batch already is the global statistic. Its state is replicated or FSDP-sharded
(`parallel/sharding.py`).

Every step is one compiled dispatch (forward, backward, optimizer, BN update, metrics), with the old
state's buffers donated; `train_steps` runs k steps in one dispatch (`steps_per_dispatch`) for small models
whose step is shorter than the host's per-dispatch work.
"""

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from errors import UserError, setting
from parallel import deterministic, mesh as mesh_lib, sharding as sharding_lib
from parallel.mesh import AXIS, replicated
from parallel.state import TrainState

# bn_mode -> the axis the train model's BatchNorm reduces over (None: per device, synced before eval/save).
BN_MODES: dict[str, str | None] = {'global': AXIS, 'local': None}


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Recipe options that live inside the compiled step (config fields of the same names)."""
  label_smoothing: float = 0.0
  grad_accum_steps: int = 1
  ema_decay: float = 0.0
  eval_flip: bool = False
  virtual_shards: int = 0  # `deterministic`: the V slices of every batch (0 = off; see `_fixed_train_body`).

  @classmethod
  def from_config(cls, config) -> 'StepOptions':
    return cls(config.label_smoothing, config.grad_accum_steps, config.ema_decay, config.eval_flip,
               config.virtual_shards if config.deterministic else 0)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example cross-entropy with integer labels; `label_smoothing` mixes the one-hot target with uniform."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def micro_batches(batch, k: int):
  """[n, ...] -> [k, n/k, ...] with micro-batch j = rows i where i % k == j.

  Strided, not contiguous: a device's rows start at a multiple of k (the global batch divides by
  k x devices), so micro-batch j holds the global rows g with g % k == j on every topology, and its global
  BatchNorm statistics are the same on 1 device and on 8.
  """
  return jax.tree.map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch)


def ema_update(ema, params, decay: float):
  """One EMA step: decay * ema + (1 - decay) * params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


@dataclasses.dataclass(frozen=True)
class Reductions:
  """The only difference between the per-device body and the global one: how values combine over devices."""
  mean: Callable
  sum: Callable
  min: Callable
  index: Callable  # This device's position on the axis (folded into the step's rng).


PER_DEVICE = Reductions(lambda x: lax.pmean(x, AXIS), lambda x: lax.psum(x, AXIS), lambda x: lax.pmin(x, AXIS),
                        lambda: lax.axis_index(AXIS))
# Under jit the body sees the global batch: its means and sums already are over every device.
GLOBAL = Reductions(lambda x: x, lambda x: x, lambda x: x, lambda: 0)


def _accumulate(grads_of, batch_stats, batch, rng, k: int, zeros):
  """Gradient accumulation: `grads_of` on k micro-batches in order (BatchNorm statistics carried from one to the
  next, micro-batch j's rng folded with j); returns (statistics, summed gradients, loss sum, correct count), the
  sums started from `zeros` = (gradients, loss, correct)."""
  def accumulate(carry, xs):
    stats, grad_sum, loss_sum, correct = carry
    j, micro = xs
    stats, grads, micro_loss, micro_correct = grads_of(stats, micro, jax.random.fold_in(rng, j))
    return (stats, jax.tree.map(jnp.add, grad_sum, grads), loss_sum + micro_loss, correct + micro_correct), None

  (stats, grad_sum, loss_sum, correct), _ = lax.scan(accumulate, (batch_stats, *zeros),
                                                     (jnp.arange(k), micro_batches(batch, k)))
  return stats, grad_sum, loss_sum, correct


def _train_body(state: TrainState, batch, *, model, tx, local_bn: bool, opts: StepOptions,
                reduce: Reductions = PER_DEVICE):
  """One device's step (`reduce=PER_DEVICE`: `batch` holds this device's rows, reductions go over AXIS), or
  the whole step on the global batch (`GLOBAL`, the `jit` backend).

  With `grad_accum_steps` = k the rows are k micro-batches (`micro_batches`), run one after the other by
  `lax.scan` (BatchNorm statistics per micro-batch, running averages updated k times); their mean gradient
  is all-reduced once.
  """
  batch_stats = jax.tree.map(lambda x: x[0], state.batch_stats) if local_bn else state.batch_stats
  labels = batch['label']
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), reduce.index())

  def grads_of(stats, micro, key):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': stats}, micro['image'], train=True,
                                    mutable=['batch_stats'], rngs={'dropout': key})
      loss = cross_entropy(logits, micro['label'], opts.label_smoothing).mean()
      return loss, (logits, updates['batch_stats'])

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    m = micro['label'].shape[0]
    return new_stats, grads, loss * m, jnp.sum(jnp.argmax(logits, -1) == micro['label'])

  k = opts.grad_accum_steps
  if k == 1:
    new_stats, grads, loss_sum, correct = grads_of(batch_stats, batch, rng)
  else:
    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    new_stats, grad_sum, loss_sum, correct = _accumulate(grads_of, batch_stats, batch, rng, k, zeros)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
  grads = reduce.mean(grads)
  if local_bn:
    new_stats = jax.tree.map(lambda x: x[None], new_stats)
  metrics = {'loss_sum': reduce.sum(loss_sum),
             'correct': reduce.sum(correct),
             'count': reduce.sum(jnp.asarray(labels.shape[0], jnp.int32)),
             'finite': reduce.min(jnp.isfinite(loss_sum).astype(jnp.int32))}
  return _update(state, grads, new_stats, tx, opts), metrics


def _update(state: TrainState, grads, new_stats, tx, opts: StepOptions) -> TrainState:
  """The optimizer and EMA step after the gradients are reduced (replicated, elementwise: any order is fixed)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = ema_update(state.ema_params, params, opts.ema_decay) if opts.ema_decay else state.ema_params
  return state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state,
                       ema_params=ema_params)


def _fixed_train_body(state: TrainState, batch, *, model, tx, opts: StepOptions, per: int, **_):
  """`deterministic`: one device's step whose bits do not depend on the device or process count.

  The global batch is V = `opts.virtual_shards` slices of equal size; this device holds `per` = V / devices
  consecutive ones. The model runs slice by slice (`deterministic.SliceWise`: every module without BatchNorm
  per slice, BatchNorm with fixed-order statistics and backward sums), the loss and metrics per slice, and
  every sum over slices (gradients, loss, correct predictions) takes `deterministic.fixed_sum`'s one tree.
  Gradients are taken w.r.t. the params broadcast to [per, ...], so they come out per slice. Micro-batches
  (`grad_accum_steps`) are the strided ones of `micro_batches`, cut into the same V slices; per-slice
  gradients and metrics add up over them in order, then one fixed sum. Dropout keys are per global slice.
  """
  labels = batch['label']
  global_rows = labels.shape[0] * opts.virtual_shards // per
  first = lax.axis_index(AXIS) * per
  rng = jax.random.fold_in(state.rng, state.step)
  stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (per,) + p.shape), state.params)

  def grads_of(stats, micro, key):
    def loss_fn(stacked):
      slicer = deterministic.SliceWise(stacked, stats, per, key, first)
      with nn.intercept_methods(slicer):
        logits, updates = model.apply({'params': state.params, 'batch_stats': stats}, micro['image'], train=True,
                                      mutable=['batch_stats'], rngs={'dropout': key})
      slicer.check_covered(state.params)

      def one(lg, lb):
        return (jnp.sum(cross_entropy(lg, lb, opts.label_smoothing)),
                jnp.sum(jnp.argmax(lg, -1) == lb).astype(jnp.int32))
      loss_sums, correct = deterministic.scan_slices(one, deterministic.split_slices(logits, per),
                                                     deterministic.split_slices(micro['label'], per))
      return jnp.sum(loss_sums) / global_rows, (loss_sums, correct, updates['batch_stats'])

    (_, (loss_sums, correct, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(stacked)
    return new_stats, grads, loss_sums, correct

  k = opts.grad_accum_steps
  if k == 1:
    new_stats, grads, loss_sums, correct = grads_of(state.batch_stats, batch, rng)
  else:
    zeros = (jax.tree.map(jnp.zeros_like, stacked), jnp.zeros((per,), jnp.float32), jnp.zeros((per,), jnp.int32))
    new_stats, grads, loss_sums, correct = _accumulate(grads_of, state.batch_stats, batch, rng, k, zeros)
  grads, loss_sum, correct = deterministic.fixed_sum((grads, loss_sums, correct))
  metrics = {'loss_sum': loss_sum, 'correct': correct, 'count': jnp.asarray(global_rows, jnp.int32),
             'finite': jnp.isfinite(loss_sum).astype(jnp.int32)}
  return _update(state, grads, new_stats, tx, opts), metrics


def _eval_body(state: TrainState, batch, *, model, use_ema: bool = False, flip: bool = False,
               reduce: Reductions = PER_DEVICE):
  """Sums (not means) of loss, correct predictions (top-1, and top-5 with more than 5 classes) and real
  examples; padded rows have mask 0. With `use_ema` the EMA params are evaluated; with `flip` (`eval_flip`)
  the logits are the mean of the image's and its left-right mirror's, still one prediction per example."""
  params = state.ema_params if use_ema else state.params
  apply = lambda x: model.apply({'params': params, 'batch_stats': state.batch_stats}, x, train=False)
  logits = apply(batch['image'])
  if flip:  # NHWC: axis 2 is the width.
    logits = (logits + apply(jnp.flip(batch['image'], axis=2))) / 2
  mask, labels = batch['mask'], batch['label']
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  sums = {'loss_sum': reduce.sum(jnp.sum(losses * mask)),
          'correct': reduce.sum(jnp.sum((jnp.argmax(logits, -1) == labels) * mask)),
          'count': reduce.sum(jnp.sum(mask))}
  if logits.shape[-1] > 5:
    in_top5 = jnp.any(lax.top_k(logits, 5)[1] == labels[:, None], axis=-1)
    sums['correct_top5'] = reduce.sum(jnp.sum(in_top5 * mask))
  return sums


def _fixed_eval_body(state: TrainState, batch, *, model, use_ema: bool = False, flip: bool = False, per: int,
                     **_):
  """`deterministic`: `_eval_body`'s sums, computed per slice (the whole model in one `lax.map` over this
  device's `per` slices) and added in `deterministic.fixed_sum`'s order."""
  per_slice = lambda one: _eval_body(state, one, model=model, use_ema=use_ema, flip=flip, reduce=GLOBAL)
  slices = jax.tree.map(lambda x: deterministic.split_slices(x, per), batch)
  return deterministic.fixed_sum(deterministic.scan_slices(per_slice, slices))


class Stepper:
  """Compiled train/eval steps, batch placement and state layout for one backend (a subclass).

  The *canonical* state (checkpoints, init) is replicated over the mesh with unstacked `batch_stats`.
  `to_device` / `to_canonical` convert to and from the backend's own layout; `place` puts this process's
  rows of a global batch on the devices in the layout the steps take.
  """

  def __init__(self, mesh, model, eval_model, tx, bn_mode: str = 'global', options: StepOptions = StepOptions()):
    self.mesh, self.local_bn, self.options = mesh, BN_MODES[bn_mode] is None, options
    self.num_devices = mesh.devices.size
    self.local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    self._splitters = {}
    self.fixed_order = options.virtual_shards > 0
    train_body, eval_body, fixed = _train_body, _eval_body, {}
    if self.fixed_order:  # Per-device bodies under every backend (jit wraps them in a shard_map).
      train_body, eval_body = _fixed_train_body, _fixed_eval_body
      fixed = dict(per=options.virtual_shards // self.num_devices)
    self._train = functools.partial(train_body, model=model, tx=tx, local_bn=self.local_bn and self.stacks_bn,
                                    opts=options, reduce=self.reductions, **fixed)
    self._evaluate = functools.partial(eval_body, model=eval_model, use_ema=options.ema_decay > 0,
                                       flip=options.eval_flip, reduce=self.reductions, **fixed)

  stacks_bn = True  # Whether local-BN stats carry an explicit device axis inside the body.
  reductions = PER_DEVICE

  def _train_scan(self, state: TrainState, batches):
    """`steps_per_dispatch`: k train steps in one dispatch, one after the other (`lax.scan` over the leading
    axis of `batches`); the metrics come back stacked, one entry per step."""
    return lax.scan(self._train, state, batches)

  def place(self, local_batch):
    """This process's rows of a global batch (host numpy) -> device arrays in the layout of `train_step`."""
    raise NotImplementedError

  def place_steps(self, local_batches):
    """k steps' rows stacked on a leading axis [k, rows, ...] -> the layout of `train_steps`."""
    raise NotImplementedError

  def place_each(self, local_batches) -> list:
    """k steps' rows stacked [k, rows, ...] -> k batches in the layout of `train_step`, with one transfer and
    one dispatch for all k: a transfer per step costs ~70 µs of host time, a small model's whole step."""
    return self.split_steps(self.place_steps(local_batches), len(jax.tree.leaves(local_batches)[0]))

  def split_steps(self, placed, k: int) -> list:
    """k steps placed for `train_steps` (`place_steps`) -> the k batches in the layout of `train_step`, in one
    dispatch (one compiled program per k)."""
    if k not in self._splitters:
      self._splitters[k] = self._splitter(k)
    return self._splitters[k](placed)

  def _splitter(self, k: int):
    raise NotImplementedError

  def sync_batch_stats(self, state: TrainState) -> TrainState:
    """Local BN mode: every device gets the cross-device mean of `batch_stats`. No-op in global mode."""
    if not self.local_bn:
      return state
    return state.replace(batch_stats=self._sync(state.batch_stats))

  def eval_step(self, eval_state: TrainState, batch):
    """Host values of the sums over this eval batch (see `_eval_body`)."""
    return self.metrics(self._eval(eval_state, batch))

  def metrics(self, metrics):
    """Host (numpy) values of metrics as returned by `train_step` or `eval_step`; blocks until ready."""
    return jax.device_get(metrics)


class GlobalBatches:
  """Placement of global `jax.Array` batches sharded over `data` (shard_map and jit)."""

  @functools.cached_property
  def _batch_sharding(self):
    return mesh_lib.batch_sharding(self.mesh)

  @functools.cached_property
  def _steps_sharding(self):
    return NamedSharding(self.mesh, P(None, AXIS))

  def place(self, local_batch):
    if jax.process_count() == 1:  # One transfer call for the whole batch: ~2x cheaper than per-leaf assembly.
      return jax.device_put(local_batch, self._batch_sharding)
    return mesh_lib.to_global(self.mesh, local_batch)

  def place_steps(self, local_batches):
    if jax.process_count() == 1:
      return jax.device_put(local_batches, self._steps_sharding)
    return mesh_lib.to_global(self.mesh, local_batches, batch_axis=1)

  def _splitter(self, k: int):
    return jax.jit(lambda b: [jax.tree.map(lambda x, i=i: x[i], b) for i in range(k)],
                   out_shardings=self._batch_sharding)


class ShardMapStepper(GlobalBatches, Stepper):
  """`jax.shard_map` over the mesh: global `jax.Array` batches, one jit per step."""

  def __init__(self, mesh, model, eval_model, tx, bn_mode: str = 'global', options: StepOptions = StepOptions()):
    super().__init__(mesh, model, eval_model, tx, bn_mode, options)
    spec = TrainState(step=P(), params=P(), batch_stats=P(AXIS) if self.local_bn else P(), opt_state=P(),
                      rng=P(), ema_params=P())
    smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    self.train_step = jax.jit(smap(self._train, in_specs=(spec, P(AXIS)), out_specs=(spec, P())),
                              donate_argnums=0)
    self.train_steps = jax.jit(smap(self._train_scan, in_specs=(spec, P(None, AXIS)), out_specs=(spec, P())),
                               donate_argnums=0)
    self._eval = jax.jit(smap(self._evaluate, in_specs=(P(), P(AXIS)), out_specs=P()))
    self._sync = jax.jit(smap(lambda bs: lax.pmean(bs, AXIS), in_specs=P(AXIS), out_specs=P(AXIS)))
    # After a sync every device holds the same stats: each one's copy is the replicated value.
    self._unstack = jax.jit(smap(lambda bs: jax.tree.map(lambda x: x[0], bs), in_specs=P(AXIS), out_specs=P()))

  def to_device(self, state: TrainState) -> TrainState:
    """Canonical (replicated) state -> this backend's layout."""
    if not self.local_bn:
      return state
    stacked = jax.jit(lambda bs: jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_devices,) + x.shape), bs),
                      out_shardings=NamedSharding(self.mesh, P(AXIS)))
    return state.replace(batch_stats=stacked(state.batch_stats))

  def to_canonical(self, state: TrainState) -> TrainState:
    """This backend's layout -> canonical; call after `sync_batch_stats` in local mode."""
    if not self.local_bn:
      return state
    return state.replace(batch_stats=self._unstack(state.batch_stats))

  def eval_state(self, state: TrainState) -> TrainState:
    """The layout `eval_step` takes, from a train-layout state after `sync_batch_stats`."""
    return self.to_canonical(state)


class PmapStepper(Stepper):
  """`jax.pmap`: a leading local-device axis on every batch and state leaf."""
  stacks_bn = False  # pmap keeps one copy per device already.

  def __init__(self, mesh, model, eval_model, tx, bn_mode: str = 'global', options: StepOptions = StepOptions()):
    super().__init__(mesh, model, eval_model, tx, bn_mode, options)
    devices = None if self.num_devices == jax.device_count() else list(mesh.devices.flat)
    pmap = functools.partial(jax.pmap, axis_name=AXIS, devices=devices)
    self.train_step = pmap(self._train, donate_argnums=0)
    self.train_steps = pmap(self._train_scan, donate_argnums=0)
    self._eval = pmap(self._evaluate)
    self._sync = pmap(lambda bs: lax.pmean(bs, AXIS))
    self._local = NamedSharding(jax.sharding.Mesh(np.array(self.local_devices), (AXIS,)), P(AXIS))

  def place(self, local_batch):
    n = len(self.local_devices)
    return jax.tree.map(lambda x: jax.device_put(x.reshape((n, -1) + x.shape[1:]), self._local), local_batch)

  def place_steps(self, local_batches):
    n = len(self.local_devices)
    return jax.tree.map(lambda x: jax.device_put(x.reshape((x.shape[0], n, -1) + x.shape[2:]).swapaxes(0, 1),
                                                 self._local), local_batches)

  def _splitter(self, k: int):
    return jax.jit(lambda b: [jax.tree.map(lambda x, i=i: x[:, i], b) for i in range(k)], out_shardings=self._local)

  def to_device(self, state: TrainState) -> TrainState:
    n = len(self.local_devices)
    return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(_host(x), (n,) + x.shape), self._local), state)

  def to_canonical(self, state: TrainState) -> TrainState:
    rep = replicated(self.mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rep, _host(x)[0]), state)

  def eval_state(self, state: TrainState) -> TrainState:
    return state

  def metrics(self, metrics):
    """pmap returns one copy per device: read the first from its buffer (indexing the device array would
    dispatch a computation per metric, ~6 ms per step)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]), metrics)


class JitStepper(GlobalBatches, Stepper):
  """`jax.jit` over global arrays: the body runs on the whole batch (`GLOBAL` reductions) and the partitioner
  inserts the collectives. The state is replicated (`shard_params=none`) or FSDP-sharded (`fsdp`,
  `parallel/sharding.py`); each step keeps the state's layout. Global BatchNorm only (models built with
  `bn_axis_name=None`): a mean over the sharded global batch is the global statistic.

  The canonical state stays replicated: `to_device` shards it, `to_canonical` gathers it back.
  """

  def __init__(self, mesh, model, eval_model, tx, bn_mode: str = 'global', options: StepOptions = StepOptions(),
               shard_params: str = 'none', fsdp_min_bytes: int = sharding_lib.FSDP_MIN_BYTES):
    if BN_MODES[bn_mode] is None:
      raise UserError(f'{setting("bn_mode")}=local needs per-device steps: use it with '
                      f'{setting("parallel_backend")}=shard_map or pmap, or bn_mode=global with jit')
    super().__init__(mesh, model, eval_model, tx, bn_mode, options)
    self.shard_params, self.fsdp_min_bytes = shard_params, fsdp_min_bytes
    self.canonical_mesh = mesh
    # Auto axes: the partitioner, not the array types, decides where to gather FSDP params and reduce grads.
    self.mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                                  axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    self._replicated = replicated(self.mesh)
    self._reshards = {}
    train, train_scan, evaluate = self._train, self._train_scan, self._evaluate
    if self.fixed_order:  # The fixed-order sums are per-device code: run them in a shard_map inside the jit.
      smap = functools.partial(jax.shard_map, mesh=self.mesh, check_vma=False)
      train = smap(train, in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
      train_scan = smap(train_scan, in_specs=(P(), P(None, AXIS)), out_specs=(P(), P()))
      evaluate = smap(evaluate, in_specs=(P(), P(AXIS)), out_specs=P())
    self.train_step = jax.jit(self._global_step(train), donate_argnums=0)
    self.train_steps = jax.jit(self._global_step(train_scan), donate_argnums=0)
    self._eval = jax.jit(lambda state, batch: self._metrics_out(evaluate(state, batch)))

  reductions = GLOBAL

  def state_shardings(self, state):
    """The shardings of this backend's layout of `state` (arrays or abstract arrays)."""
    return sharding_lib.state_shardings(state, self.mesh, self.shard_params, self.fsdp_min_bytes)

  def _metrics_out(self, metrics):
    return jax.lax.with_sharding_constraint(metrics, jax.tree.map(lambda _: self._replicated, metrics))

  def _global_step(self, body):
    """The step keeps the state's layout: the shardings follow from the shapes, so they are fixed at trace time."""
    def step(state, batch):
      new_state, metrics = body(state, batch)
      return jax.lax.with_sharding_constraint(new_state, self.state_shardings(new_state)), self._metrics_out(metrics)
    return step

  def _reshard(self, state, shardings):
    """A jitted identity: moves (gathers, splits) global arrays between layouts on any process count."""
    key = jax.tree.structure(state), tuple(jax.tree.leaves(shardings))
    if key not in self._reshards:  # Checkpoints convert at every save: compile once.
      self._reshards[key] = jax.jit(lambda s: s, out_shardings=shardings)
    return self._reshards[key](state)

  def to_device(self, state: TrainState) -> TrainState:
    """Canonical (replicated) state -> replicated or FSDP-sharded, on this backend's mesh."""
    return self._reshard(state, self.state_shardings(state))

  def to_canonical(self, state: TrainState) -> TrainState:
    canonical = replicated(self.canonical_mesh)
    return self._reshard(state, jax.tree.map(lambda _: canonical, state))

  def eval_state(self, state: TrainState) -> TrainState:
    return state


# parallel_backend -> Stepper class.
BACKENDS: dict[str, Callable[..., Stepper]] = {'shard_map': ShardMapStepper, 'pmap': PmapStepper, 'jit': JitStepper}


def train_bn_axis(config) -> str | None:
  """The `bn_axis_name` of the train model: BN_MODES' axis for the per-device backends, None under jit."""
  return None if BACKENDS[config.parallel_backend].reductions is GLOBAL else BN_MODES[config.bn_mode]


def make_stepper(config, mesh, model, eval_model, tx) -> Stepper:
  cls = BACKENDS[config.parallel_backend]
  layout = dict(shard_params=config.shard_params, fsdp_min_bytes=config.fsdp_min_bytes) if cls is JitStepper else {}
  return cls(mesh, model, eval_model, tx, config.bn_mode, StepOptions.from_config(config), **layout)


def _host(x) -> np.ndarray:
  """A fully addressable or replicated array's value on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)

"""One per-device step body, run under `jax.shard_map` (default) or `jax.pmap`.

The body sees one device's slice of the batch. It averages gradients over the `data` axis with an explicit
`lax.pmean`, which is only correct with `check_vma=False` under shard_map (with the default `True`,
gradients of replicated params arrive already summed over devices). pmap has the same semantics, so one
body serves both backends, and the tests compare them.

BatchNorm (`bn_mode`):
  - `global`: the model's BatchNorm reduces over the `data` axis: statistics of the whole global batch,
    identical `batch_stats` everywhere (replicated).
  - `local`: per-device statistics; `batch_stats` carry a device axis and are averaged by `sync_batch_stats`
    before every eval and checkpoint (the classic recipe).

Every step is one compiled dispatch (forward, backward, optimizer, BN update, metrics), with the old
state's buffers donated.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from errors import UserError
from parallel.mesh import AXIS, replicated

BACKENDS = ('shard_map', 'pmap')
BN_MODES = ('global', 'local')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def _train_body(state: TrainState, batch, *, model, tx, local_bn: bool):
  """One device's step. `batch` holds this device's rows; all reductions go over AXIS."""
  batch_stats = jax.tree.map(lambda x: x[0], state.batch_stats) if local_bn else state.batch_stats
  images, labels = batch['image'], batch['label']
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(AXIS))

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                  mutable=['batch_stats'], rngs={'dropout': rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if local_bn:
    new_stats = jax.tree.map(lambda x: x[None], new_stats)
  n = labels.shape[0]
  metrics = {'loss_sum': lax.psum(loss * n, AXIS),
             'correct': lax.psum(jnp.sum(jnp.argmax(logits, -1) == labels), AXIS),
             'count': lax.psum(n, AXIS),
             'finite': lax.pmin(jnp.isfinite(loss).astype(jnp.int32), AXIS)}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
  return new_state, metrics


def _eval_body(state: TrainState, batch, *, model):
  """Sums (not means) of loss, correct predictions and real examples; padded rows have mask 0."""
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False)
  mask = batch['mask']
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  return {'loss_sum': lax.psum(jnp.sum(losses * mask), AXIS),
          'correct': lax.psum(jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask), AXIS),
          'count': lax.psum(jnp.sum(mask), AXIS)}


class Stepper:
  """Compiled train/eval steps and state layout for one backend.

  The *canonical* state (checkpoints, init) is replicated over the mesh with unstacked `batch_stats`.
  `to_device` / `to_canonical` convert to and from the backend's own layout.
  """

  def __init__(self, mesh, model, eval_model, tx, backend: str = 'shard_map', bn_mode: str = 'global'):
    if backend not in BACKENDS:
      raise UserError(f'unknown parallel_backend {backend!r}: set --config.parallel_backend to one of {BACKENDS}')
    if bn_mode not in BN_MODES:
      raise UserError(f'unknown bn_mode {bn_mode!r}: set --config.bn_mode to one of {BN_MODES}')
    self.mesh, self.backend, self.local_bn = mesh, backend, bn_mode == 'local'
    self.num_devices = mesh.devices.size
    self.local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    train = functools.partial(_train_body, model=model, tx=tx, local_bn=self.local_bn and backend == 'shard_map')
    evaluate = functools.partial(_eval_body, model=eval_model)
    if backend == 'shard_map':
      spec = self._state_spec()
      self.train_step = jax.jit(jax.shard_map(train, mesh=mesh, in_specs=(spec, P(AXIS)), out_specs=(spec, P()),
                                              check_vma=False), donate_argnums=0)
      self._eval = jax.jit(jax.shard_map(evaluate, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(),
                                         check_vma=False))
      self._sync = jax.jit(jax.shard_map(lambda bs: lax.pmean(bs, AXIS), mesh=mesh, in_specs=P(AXIS),
                                         out_specs=P(AXIS), check_vma=False))
      # After a sync every device holds the same stats: each one's copy is the replicated value.
      self._unstack = jax.jit(jax.shard_map(lambda bs: jax.tree.map(lambda x: x[0], bs), mesh=mesh,
                                            in_specs=P(AXIS), out_specs=P(), check_vma=False))
    else:
      self.train_step = jax.pmap(train, axis_name=AXIS, donate_argnums=0, devices=self._pmap_devices())
      self._eval = jax.pmap(evaluate, axis_name=AXIS, devices=self._pmap_devices())
      self._sync = jax.pmap(lambda bs: lax.pmean(bs, AXIS), axis_name=AXIS, devices=self._pmap_devices())

  def _pmap_devices(self):
    """None (pmap's default: every device) unless the mesh is a single-process subset of them."""
    return None if self.num_devices == jax.device_count() else list(self.mesh.devices.flat)

  def _state_spec(self):
    return TrainState(step=P(), params=P(), batch_stats=P(AXIS) if self.local_bn else P(), opt_state=P(), rng=P())

  # --- layouts -------------------------------------------------------------------------------------------
  def to_device(self, state: TrainState) -> TrainState:
    """Canonical (replicated) state -> this backend's layout."""
    if self.backend == 'pmap':
      n = len(self.local_devices)
      sharding = NamedSharding(jax.sharding.Mesh(np.array(self.local_devices), (AXIS,)), P(AXIS))
      return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(_host(x), (n,) + x.shape), sharding), state)
    if self.local_bn:
      stacked = jax.jit(lambda bs: jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_devices,) + x.shape), bs),
                        out_shardings=NamedSharding(self.mesh, P(AXIS)))
      return state.replace(batch_stats=stacked(state.batch_stats))
    return state

  def to_canonical(self, state: TrainState) -> TrainState:
    """This backend's layout -> canonical; call after `sync_batch_stats` in local mode."""
    rep = replicated(self.mesh)
    if self.backend == 'pmap':
      return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rep, _host(x)[0]), state)
    if self.local_bn:
      return state.replace(batch_stats=self._unstack(state.batch_stats))
    return state

  def sync_batch_stats(self, state: TrainState) -> TrainState:
    """Local BN mode: every device gets the cross-device mean of `batch_stats`. No-op in global mode."""
    if not self.local_bn:
      return state
    return state.replace(batch_stats=self._sync(state.batch_stats))

  def eval_state(self, state: TrainState) -> TrainState:
    """The layout `eval_step` takes, from a train-layout state after `sync_batch_stats`."""
    return self.to_canonical(state) if self.backend == 'shard_map' else state

  def eval_step(self, eval_state: TrainState, batch):
    """Host values of the sums over this eval batch (see `_eval_body`)."""
    return self.metrics(self._eval(eval_state, batch))

  def metrics(self, metrics):
    """Host (numpy) values of metrics as returned by `train_step` or `_eval`; blocks until they are ready.

    pmap returns one copy per device: read the first from its buffer (indexing the device array would
    dispatch a computation per metric, ~6 ms per step).
    """
    if self.backend == 'pmap':
      return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]), metrics)
    return jax.device_get(metrics)


def _host(x) -> np.ndarray:
  """A fully addressable or replicated array's value on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)

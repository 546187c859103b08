"""Orbax checkpoints in `WORKDIR/checkpoints`: async saves, verified restores, newest-valid resume, no pickle.

Each step directory holds `state` (params, batch_stats, optimizer state, step, rng: the data position
follows from the step) and `meta` (JSON: fingerprint of model, dataset, optimizer and shapes, the frozen config
fields (`workdir.FROZEN`) and the data's identity, plus a SHA-256 of the state's bytes). A resume must match
what the newest checkpoint records (`compare`), with or without config.json; restore moves aside (never
deletes) a checkpoint that cannot be read or whose bytes no longer match their checksum.

A save never fails quietly: a state with NaN/Inf is never written, and a save that fails (synchronously or
in Orbax's background thread) stops the run with one `SaveFailed` line instead of training on.
"""

import hashlib
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

import storage
from errors import UserError, first_line, setting
from parallel import agreement
from parallel.state import checkpoint_tree, from_checkpoint_tree
from storage import orbax_route
from trainer import workdir as workdir_lib

CHECKSUM_KEY = 'state_sha256'

orbax_route.install()  # Bounded retries, s3:// directories.


def _orbax_unraisable_as_one_line(previous):
  """A damaged checkpoint fails several of Orbax's concurrent array reads; the ones never awaited surface at
  garbage collection as "Exception ignored in <coroutine>" plus a traceback, after the run has already set
  the checkpoint aside in one line. Those (and only those: raised in Orbax's code) become one log line."""
  def hook(unraisable):
    in_orbax = any('/orbax/' in frame.f_code.co_filename for frame, _ in traceback.walk_tb(unraisable.exc_traceback))
    if not in_orbax or not isinstance(unraisable.exc_value, Exception):
      return previous(unraisable)
    logging.info('An Orbax task failed after its error was handled (%s: %s)', type(unraisable.exc_value).__name__,
                 first_line(unraisable.exc_value, 100))
  hook.quiets_orbax = True
  return hook


if not getattr(sys.unraisablehook, 'quiets_orbax', False):
  sys.unraisablehook = _orbax_unraisable_as_one_line(sys.unraisablehook)


class SaveFailed(UserError):
  """A checkpoint could not be written: the run stops rather than train on a state it cannot keep."""


class ChecksumMismatch(ValueError):
  """A checkpoint's bytes differ from what was saved (bit rot, a damaged copy): set aside like an unreadable one."""


class NotFinite(UserError):
  """The state to save holds NaN or Inf (the loss may still have been finite)."""


def fingerprint(config, state, data_identity: dict) -> dict:
  """What must match for a checkpoint to be resumable by this config (`compare` says how)."""
  frozen = {k: config[k] for k in workdir_lib.FROZEN if k in config}
  shapes = {jax.tree_util.keystr(k): list(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(
      {'params': state.params, 'batch_stats': state.batch_stats, 'opt_state': state.opt_state,
       'ema_params': state.ema_params})}  # No EMA: {} adds no entry, so fingerprints match older runs.
  return {'model': config.model, 'dataset': config.dataset, 'optimizer': config.optimizer, 'shapes': shapes,
          'config': json.loads(json.dumps(frozen)), 'data': data_identity,
          'reduction_order': reduction_order(config)}


def reduction_order(config) -> str:
  """How the run's sums are ordered: 'fixed over V slices' with `deterministic` (its bits depend on V, never
  on the topology), else 'topology'. A resume that changes it is refused: the continued run would match no
  uninterrupted one."""
  if config.get('deterministic', False):
    return f'fixed over virtual_shards={config.virtual_shards} slices'
  return 'topology'


def data_summary(identity: dict) -> dict:
  """The data identity without its class list (config_history.jsonl; ImageNet has 1000 names)."""
  return {'examples': identity.get('examples'), 'num_classes': len(identity.get('classes', ())),
          'digest': identity.get('digest')}


def _full_value(leaf) -> np.ndarray:
  """A leaf's whole value on this host: a sharded array (FSDP; in a multi-process run each process may hold
  only part of it) is gathered first, so any layout of the same values has the same checksum."""
  if not isinstance(leaf, jax.Array):
    return np.asarray(leaf)
  if leaf.is_fully_replicated:
    return np.asarray(leaf.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def checksum(state) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes of its full value (any sharding; every process
  calls it)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    value = _full_value(leaf)
    h.update(f'{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape};'.encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


@jax.jit
def _all_finite(tree) -> jax.Array:
  """One fused reduction on the devices: True when every floating leaf is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _class_mismatch(saved: list, current: list) -> str:
  if len(saved) != len(current):
    return f'{len(saved)} classes (this run: {len(current)})'
  k = next(k for k, (a, b) in enumerate(zip(saved, current, strict=True)) if a != b)
  return f'class {k} named {saved[k]!r} (this run: {current[k]!r})'


def _describe_mismatch(saved: dict, current: dict) -> str:
  """The first structural difference (model, dataset, optimizer, classes, shapes), or ''. Keys the saved meta
  lacks (checkpoints written before they were recorded) are not compared."""
  for key in ('model', 'dataset', 'optimizer'):
    if key in saved and saved[key] != current[key]:
      return f'{key} {saved[key]!r} (this run: {current[key]!r})'
  if saved.get('reduction_order', 'topology') != current.get('reduction_order', 'topology'):
    return (f'sums in {saved.get("reduction_order", "topology")} order (this run: {current["reduction_order"]}; '
            f'set by {setting("deterministic")} and {setting("virtual_shards")})')
  classes = saved.get('data', {}).get('classes')
  if classes is not None and list(classes) != list(current['data']['classes']):
    return _class_mismatch(list(classes), list(current['data']['classes']))
  saved_shapes = saved.get('shapes', {})
  for name in sorted(set(saved_shapes) | set(current['shapes'])):
    if saved_shapes.get(name) != current['shapes'].get(name):
      return f'{name} of shape {saved_shapes.get(name)} (this run: {current["shapes"].get(name)})'
  return ''


def compare(directory: str, step: int, saved: dict, current: dict, *, allow_data_change: bool,
            eval_only: bool):
  """(refusal line or '', allowed data change {'from', 'to'} or None) of resuming checkpoint `step` (its meta
  `saved`, checksum removed) with fingerprint `current`. The frozen config fields are compared by the caller
  (`workdir.decide`, which names them as settings). Class names must always match; other data (example
  counts, digest) only with `allow_data_change`, or in eval-only (evaluating other data is its purpose)."""
  structure = _describe_mismatch(saved, current)
  if structure:
    return (f'{directory} holds checkpoints of another run: step {step} has {structure}. They were left '
            'untouched: use a new --workdir, or the config that wrote them'), None
  old, new = saved.get('data'), current['data']
  if old is None or (old.get('examples'), old.get('digest')) == (new['examples'], new['digest']):
    return '', None
  change = {'from': data_summary(old), 'to': data_summary(new)}
  if allow_data_change or eval_only:
    return '', change

  def counts(summary):
    return ' / '.join(f'{summary["examples"].get(k)} {k}' for k in sorted(summary['examples']))

  what = (f'{counts(change["from"])} examples' if old.get('examples') != new['examples'] else
          f'the same example counts but other content (digest {str(old.get("digest"))[:12]})')
  return (f'checkpoint {step} in {directory} was trained on other data: {what}, this run has '
          f'{counts(change["to"])} (digest {new["digest"][:12]}): point {setting("data_dir")} at the data it was '
          f'trained on, set {setting("allow_data_change")}=True to continue on this data on purpose, or use a new '
          '--workdir'), None


class Checkpoints:
  """Saves and restores canonical (replicated) train states; every process must call every method."""

  def __init__(self, workdir: str, keep: int, fp: dict):
    self.directory = storage.join(workdir_lib.absolute(workdir), 'checkpoints')
    self.fingerprint = fp
    self.save_seconds = 0.0  # Host time spent in save() (checksum + starting the async write).
    self._pending: int | None = None  # A step whose async save was started but not yet confirmed.
    workdir_lib.check_checkpoint_dir(self.directory, create=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True,
                                           temporary_path_class=orbax_route.temporary_path_class(self.directory))
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))
    except OSError as e:
      raise UserError(f'cannot create {self.directory} ({e.__class__.__name__}: {e}): choose a writable '
                      '--workdir') from None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _failed(self, step, error: BaseException, doing: str = 'saving') -> UserError:
    if agreement.peer_error(error):  # A peer died or stopped mid-save: no disk advice (it is not the disk).
      what = f'saving checkpoint {step}' if step is not None else 'a checkpoint save'
      return agreement.lost_contact(f'{what} to {self.directory}', error)
    detail = first_line(error, 10_000)  # The OS error (disk full, read-only) comes last in Orbax's messages.
    detail = detail if len(detail) <= 160 else '...' + detail[-160:]
    fix = (storage.advice(self.directory, error).removesuffix(', then rerun') if storage.is_url(self.directory)
           else 'free disk space or make the directory writable')
    where = f'saving checkpoint {step} to' if doing == 'saving' else f'{doing} checkpoint {step} in'
    return SaveFailed(f'{where} {self.directory} failed ({error.__class__.__name__}: {detail}): {fix}, then rerun '
                      'the same command (it resumes from the last complete checkpoint)')

  def save(self, state) -> None:
    """Starts an async save of `state` at its step (a no-op if that step is already saved).

    Raises `NotFinite` (nothing written) if any float leaf is NaN/Inf, and `SaveFailed` if this or the
    previous save failed.
    """
    step = int(jax.device_get(state.step))
    if not bool(_all_finite((state.params, state.batch_stats, state.opt_state))):
      raise NotFinite(f'step {step}')
    self.settle()
    if step in self.manager.all_steps():
      return
    t = time.perf_counter()
    meta = dict(self.fingerprint, **{CHECKSUM_KEY: checksum(state)})
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(checkpoint_tree(state)),
                                                      meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # An unwritable directory, a full disk: stop here, never train on.
      raise self._failed(step, e) from None
    self.save_seconds += time.perf_counter() - t
    self._pending = step

  def settle(self) -> None:
    """Waits for the save in flight; raises `SaveFailed` if it did not end as a complete checkpoint."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:
      raise self._failed(step, e) from None
    if step is not None:
      try:
        self.manager.reload()  # Orbax logs and skips a background failure: check the step really is there.
      except Exception as e:  # The listing failed (storage gone): the step may be complete, or not.
        raise self._failed(step, e, doing='checking') from None
      if step not in self.manager.all_steps():
        raise self._failed(step, RuntimeError('the background write did not complete (see the log above)'))

  def poll(self) -> None:
    """Cheap check between steps (single process): surfaces a failed background save at once."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.settle()

  def wait(self) -> None:
    self.settle()

  def close(self) -> None:
    """Settles the last save, then stops Orbax's threads whatever happened (no hang at exit)."""
    try:
      self.settle()
    finally:
      try:
        self.manager.close()
      except Exception as e:  # Already reported by settle(); closing must not mask it.
        logging.warning('Closing the checkpoint manager: %s', first_line(e))

  def newest_meta(self):
    """(step, meta without its checksum) of the newest checkpoint whose meta reads, or (None, None). Reads
    only: a damaged checkpoint is set aside later, by `restore_latest`."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      except Exception:
        continue
      if isinstance(meta, dict):
        meta.pop(CHECKSUM_KEY, None)
        return step, meta
    return None, None

  def restore_latest(self, template):
    """The newest readable, verified checkpoint restored into `template`'s structure and shardings, or None."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpoint_tree(template))
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      except Exception as e:  # Unreadable metadata: treat as a damaged checkpoint.
        self._set_aside(step, e)
        continue
      saved_sum = meta.pop(CHECKSUM_KEY, None) if isinstance(meta, dict) else None
      # Structure only: the newest checkpoint was judged in full before anything was written (workdir.decide).
      mismatch = _describe_mismatch(meta, self.fingerprint) if isinstance(meta, dict) else 'a different structure'
      if mismatch:
        raise UserError(f'{self.directory} holds checkpoints of another run: step {step} has {mismatch}. They '
                        'were left untouched: use a new --workdir, or the config that wrote them')
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        state = from_checkpoint_tree(restored['state'])
        if saved_sum is not None and checksum(state) != saved_sum:
          raise ChecksumMismatch(f'its SHA-256 differs from the one recorded at save time ({saved_sum[:12]}...)')
      except Exception as e:
        self._set_aside(step, e)
        continue
      if saved_sum is None:
        logging.warning('Checkpoint %s/%d has no checksum (written by an older version): not verified.',
                        self.directory, step)
      logging.info('Restored checkpoint %s/%d', self.directory, step)
      return state
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves an unreadable checkpoint out of Orbax's sight (kept for inspection, never deleted)."""
    src = storage.join(self.directory, str(step))
    dst = storage.join(storage.dirname(self.directory), 'checkpoints_unreadable', f'{step}-{int(time.time())}')
    logging.warning('Checkpoint %s is unreadable (%s: %s); moving it to %s and trying an older one.',
                    src, error.__class__.__name__, str(error)[:200], dst)
    print(f'WARNING: checkpoint {src} is unreadable ({error.__class__.__name__}: {first_line(error, 100)}); '
          f'moved to {dst}, resuming from the newest valid one', flush=True)
    if jax.process_index() == 0 and storage.isdir(src):
      storage.move(src, dst)  # A bucket: copy, then delete (the copy is complete before the step disappears).
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set_aside_{step}')
    self.manager.reload()

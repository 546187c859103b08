"""Orbax checkpoints in `WORKDIR/checkpoints`: async saves, newest-valid resume, no pickle, nothing deleted.

Each step directory holds `state` (params, batch_stats, optimizer state, step, rng: the data position
follows from the step) and `meta` (JSON fingerprint of model, dataset and shapes). Resume refuses a
workdir whose checkpoints belong to another model/shape, and skips (and moves aside, never deletes) a
latest checkpoint that cannot be read.
"""

import os
import shutil
import time
from typing import Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging

from errors import UserError
from trainer.state import checkpoint_tree, from_checkpoint_tree


def fingerprint(config, state) -> dict:
  """What must match for a checkpoint to be resumable by this config."""
  shapes = {jax.tree_util.keystr(k): list(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(
      {'params': state.params, 'batch_stats': state.batch_stats, 'opt_state': state.opt_state,
       'ema_params': state.ema_params})}  # No EMA: {} adds no entry, so fingerprints match older runs.
  return {'model': config.model, 'dataset': config.dataset, 'optimizer': config.optimizer, 'shapes': shapes}


def _describe_mismatch(saved: dict, current: dict) -> str:
  for key in ('model', 'dataset', 'optimizer'):
    if saved.get(key) != current[key]:
      return f'{key} {saved.get(key)!r} (this run: {current[key]!r})'
  saved_shapes = saved.get('shapes', {})
  for name in sorted(set(saved_shapes) | set(current['shapes'])):
    if saved_shapes.get(name) != current['shapes'].get(name):
      return f'{name} of shape {saved_shapes.get(name)} (this run: {current["shapes"].get(name)})'
  return 'a different structure'


class Checkpoints:
  """Saves and restores canonical (replicated) train states; every process must call every method."""

  def __init__(self, workdir: str, keep: int, fp: dict):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.fingerprint = fp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))
    except (OSError, PermissionError) as e:
      raise UserError(f'cannot create {self.directory} ({e.__class__.__name__}: {e}): choose a writable '
                      '--workdir') from None

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, state) -> None:
    """Starts an async save of `state` at its step (a no-op if that step is already saved)."""
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(checkpoint_tree(state)),
                                                    meta=ocp.args.JsonSave(self.fingerprint)))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def restore_latest(self, template):
    """The newest readable checkpoint restored into `template`'s structure and shardings, or None."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpoint_tree(template))
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      except Exception as e:  # Unreadable metadata: treat as a damaged checkpoint.
        self._set_aside(step, e)
        continue
      if meta != self.fingerprint:
        raise UserError(f'{self.directory} holds checkpoints of another run: step {step} has '
                        f'{_describe_mismatch(meta, self.fingerprint)}. They were left untouched: use a new '
                        '--workdir, or the config that wrote them')
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
      except Exception as e:
        self._set_aside(step, e)
        continue
      logging.info('Restored checkpoint %s/%d', self.directory, step)
      return from_checkpoint_tree(restored['state'])
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves an unreadable checkpoint out of Orbax's sight (kept for inspection, never deleted)."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(os.path.dirname(self.directory), 'checkpoints_unreadable', f'{step}-{int(time.time())}')
    logging.warning('Checkpoint %s is unreadable (%s: %s); moving it to %s and trying an older one.',
                    src, error.__class__.__name__, str(error)[:200], dst)
    print(f'WARNING: checkpoint {src} is unreadable ({error.__class__.__name__}); moved to {dst}, '
          'resuming from the newest valid one', flush=True)
    if jax.process_index() == 0 and os.path.isdir(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set_aside_{step}')
    self.manager.reload()

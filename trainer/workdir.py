"""The workdir: checked before anything starts, created only once the job is known to be runnable, locked
for one job at a time, and its config kept consistent across resumes (with a history of allowed changes)."""

import datetime
import fcntl
import json
import os
import socket

from absl import logging

from errors import UserError, setting

# Config fields that change the data stream or the model: a resume with another value would mix two runs.
# Fields a config does not define (older or newer configs) are not compared.
FROZEN = ('seed', 'batch_size', 'dataset', 'model', 'image_size', 'augment')
HISTORY = 'config_history.jsonl'
_MISSING = '<absent>'
_lock_file = None  # The open lock file of this process: the OS releases the lock when the process dies.


def check(workdir: str) -> None:
  """Fails early (creating nothing) when `workdir` cannot become a writable directory."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise UserError(f'--workdir={workdir} is not usable: {path} is a file, not a directory: choose another --workdir')
  if not os.access(path, os.W_OK | os.X_OK):
    raise UserError(f'--workdir={workdir} is not writable ({path} denies write access): choose a directory you '
                    'can write to')
  check_checkpoint_dir(os.path.join(os.path.abspath(workdir), 'checkpoints'))


def check_checkpoint_dir(directory: str, create: bool = False) -> None:
  """Fails at start-up (not at the first save) when `directory` cannot hold checkpoints; with `create`, makes
  it and proves it writable with a probe file (root ignores permission bits, so the probe is the real test)."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise UserError(f'{directory} is a file, but checkpoints need a directory there: remove or rename it, or choose '
                    'another --workdir')
  if os.path.isdir(directory) and not os.access(directory, os.W_OK | os.X_OK):
    raise UserError(f'cannot write checkpoints to {directory} (it denies write access): make it writable, or '
                    'choose another --workdir')
  if not create:
    return
  probe = os.path.join(directory, f'.write_test_{os.getpid()}')
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'cannot write checkpoints to {directory} ({e.strerror or e.__class__.__name__}): make it '
                    'writable, free disk space, or choose another --workdir') from None


def prepare(workdir: str) -> None:
  """Creates `workdir` and proves it writable by this process (a probe file, removed again)."""
  import jax
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'--workdir={workdir} is not writable ({e.strerror}): choose a directory you can write to') \
        from None


def lock(workdir: str) -> None:
  """Process 0 holds an exclusive `flock` on WORKDIR/.lock until it exits; a second job stops here.

  flock, not a pid file: the OS drops the lock when its holder dies, so a killed run never blocks its own
  resume. Every process of the job learns process 0's result, so all of them stop together.
  """
  import jax
  global _lock_file
  ok, holder = True, ''
  if jax.process_index() == 0 and _lock_file is None:
    path = os.path.join(workdir, '.lock')
    f = open(path, 'a+')
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder, ok = f.read().strip(), False
      f.close()
    else:
      f.truncate(0)
      f.write(f'pid {os.getpid()} on {socket.gethostname()} since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n')
      f.flush()
      _lock_file = f
  if not _process_0_says(ok):
    raise UserError(f'--workdir={workdir} is in use by another run ({holder or "its process 0 holds the lock"}): '
                    'wait for it to finish or stop it, or choose another --workdir')


def _process_0_says(ok: bool) -> bool:
  """Process 0's verdict, on every process: all stop together (none waits for a peer that left)."""
  import jax
  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _read_config(path: str):
  """The saved config as a dict, or None (with a warning) when it cannot be read."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError('not a JSON object')
    return saved
  except (OSError, ValueError) as e:
    logging.warning('%s is unreadable (%s): not comparing the config with the previous run; the checkpoints\' '
                    'own fingerprint still guards the resume.', path, e)
    return None


def record_config(workdir: str, config, resume_step) -> None:
  """Writes config.json. On a resume (`resume_step` not None), refuses changes to `FROZEN` fields, naming
  each, and records every other change in `config_history.jsonl` plus a log line."""
  import jax
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  is_main = jax.process_index() == 0
  saved = _read_config(path) if resume_step is not None and is_main else None  # Process 0 decides for all.
  refusal = ''
  if saved is not None:
    changed = {k: (saved.get(k, _MISSING), current.get(k, _MISSING))
               for k in sorted(set(saved) | set(current)) if saved.get(k, _MISSING) != current.get(k, _MISSING)}
    frozen = [k for k in FROZEN if k in changed and _MISSING not in changed[k]]
    if frozen:
      what = ', '.join(f'{setting(k)} {changed[k][0]!r} -> {changed[k][1]!r}' for k in frozen)
      refusal = (f'--workdir={workdir} holds a run with another config: {what}. These change the data stream '
                 f'or the model, so its checkpoints cannot continue this run: rerun with the values in {path}, '
                 'or use a new --workdir')
    elif changed:
      entry = {'time': round(datetime.datetime.now().timestamp(), 3), 'step': resume_step,
               'changes': {k: {'from': a, 'to': b} for k, (a, b) in changed.items()}}
      try:
        with open(os.path.join(workdir, HISTORY), 'a') as f:
          f.write(json.dumps(entry) + '\n')
      except OSError as e:
        raise UserError(f'cannot write {os.path.join(workdir, HISTORY)} ({e.strerror}): make the workdir '
                        'writable') from None
      logging.info('Config changed on resume at step %d: %s (recorded in %s)', resume_step,
                   ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changed.items()), HISTORY)
  if resume_step is not None and not _process_0_says(not refusal):
    raise UserError(refusal or f'process 0 refused to resume in --workdir={workdir} with this config (see its error)')
  if is_main:
    try:
      with open(path, 'w') as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
    except OSError as e:
      raise UserError(f'cannot write {path} ({e.strerror}): remove whatever is in its place, or choose another '
                      '--workdir') from None

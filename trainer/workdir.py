"""The workdir: checked before anything starts, created only once the job is known to be runnable, locked
for one job at a time, and its config kept consistent across resumes (with a history of allowed changes)."""

import atexit
import dataclasses
import datetime
import fcntl
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from typing import Any

from absl import logging

import storage
from errors import UserError, claim_line, first_line, setting
from storage import health, lease

# Config fields that change the data stream or the model: a resume with another value would mix two runs.
# Fields a config does not define (older or newer configs) are not compared.
FROZEN = ('seed', 'batch_size', 'dataset', 'model', 'image_size', 'augment')
HISTORY = 'config_history.jsonl'
_MISSING = '<absent>'
_lock_file = None  # The open lock file of this process: the OS releases the lock when the process dies.
_lease = None  # The bucket lease this process holds (`_BucketLease`).


def check(workdir: str) -> None:
  """Fails early (creating nothing) when `workdir` cannot become a writable directory. A bucket URL: one probe
  object written and deleted (the bucket exists, the credentials may write, the endpoint answers)."""
  if storage.is_url(workdir):
    storage.probe_writable(workdir)
    health.watch(workdir)  # From now on, an endpoint that stops answering stops the run in health.DOWN_S.
    return
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
  if storage.is_url(directory):
    if create:
      storage.probe_writable(directory)
    return
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
  if storage.is_url(workdir):
    storage.probe_writable(workdir)
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'--workdir={workdir} is not writable ({e.strerror}): choose a directory you can write to') \
        from None


def lock(workdir: str, lease_s: float = 60) -> None:
  """Process 0 holds an exclusive lock on WORKDIR/.lock until it exits; a second job stops here.

  Local: `flock`, not a pid file: the OS drops the lock when its holder dies, so a killed run never blocks its
  own resume. A bucket: a lease (`_BucketLease`), as a bucket has no flock. Every process of the job learns
  process 0's result, so all of them stop together.
  """
  import jax
  global _lock_file
  ok, holder = True, ''
  if storage.is_url(workdir):
    return _lock_url(workdir, lease_s)
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


def _lock_url(workdir: str, lease_s: float) -> None:
  """Process 0 takes the bucket lease (waiting at most `lease_s` for a killed holder's to expire); the other
  processes wait for its verdict through the coordination service (not a collective: the wait may outlast
  --collective_timeout)."""
  import jax
  global _lease
  refusal = ''
  if _lease is not None and _lease.workdir != workdir:  # Another job in this process (in-process callers).
    _lease.release()
    _lease = None
  if jax.process_index() == 0 and _lease is None:
    got = _BucketLease.acquire(workdir, lease_s)
    if isinstance(got, str):
      refusal = got
    else:
      _lease = got
  refusal = _process_0_line(refusal, timeout_s=2 * lease_s + 120)
  if refusal:
    raise UserError(refusal)


def _process_0_line(line: str, timeout_s: float) -> str:
  """Process 0's `line` ('' to go on) on every process, through JAX's key-value store."""
  from jax._src import distributed
  state = distributed.global_state
  if state.client is None or state.num_processes < 2:
    return line
  key = 'dptrain/workdir_lock'
  if state.process_id == 0:
    state.client.key_value_set(key, line or 'ok')
    return line
  try:
    got = state.client.blocking_key_value_get(key, int(timeout_s * 1000))
  except Exception as e:
    return f'process 0 did not take the workdir lock within {timeout_s:.0f}s ({first_line(e)}): check its log'
  return '' if got == 'ok' else 'process 0 refused the workdir: ' + got


def _boot_id() -> str:
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return ''


def _holder(data: bytes) -> dict:
  """The lease record; a `.lock` an older trainer wrote ('pid N on HOST since T') read as far as it goes."""
  try:
    record = json.loads(data)
    if isinstance(record, dict):
      return record
  except ValueError:
    pass
  m = re.match(r'pid (\d+) on (\S+) since (.+)', data.decode('utf-8', 'replace').strip())
  return {'pid': int(m.group(1)), 'host': m.group(2), 'since': m.group(3)} if m else {}


def _describe(holder: dict) -> str:
  if not holder.get('host'):
    return 'an unreadable lease record'
  renewed = f', renewed {holder["renewed"]}' if holder.get('renewed') else ''
  return f'pid {holder.get("pid")} on {holder["host"]} since {holder.get("since")}{renewed}'


def _dead_here(holder: dict) -> bool:
  """True when the holder provably is gone: it ran on this host (same name and boot) and its pid is gone."""
  if holder.get('host') != socket.gethostname() or not isinstance(holder.get('pid'), int):
    return False
  if holder.get('boot') and holder['boot'] != _boot_id():
    return True  # This host rebooted since.
  if holder['pid'] == os.getpid():
    return False
  try:
    os.kill(holder['pid'], 0)
  except ProcessLookupError:
    return True
  except OSError:
    pass
  return False


class _BucketLease:
  """A lock on a bucket: WORKDIR/.lock created only if absent, then rewritten by its holder every third of
  the lease, each write conditional on the version it wrote last (`storage.lease`). A holder that cannot
  renew within the lease, or finds the lock taken over, stops the process at once: never two writers."""

  def __init__(self, workdir: str, lease_s: float, record: dict, tag: str):
    self.workdir, self.url, self.lease_s = workdir, storage.join(workdir, '.lock'), lease_s
    self.record, self.tag = record, tag
    self.ok_at = time.monotonic()  # When the last successful write started.
    self.mutex, self.done = threading.Lock(), threading.Event()

  @classmethod
  def acquire(cls, workdir: str, lease_s: float):
    """The held lease, or the refusal line. Waits at most `lease_s` (polling) for a lease nobody renews."""
    url = storage.join(workdir, '.lock')
    now = f'{datetime.datetime.now():%Y-%m-%d %H:%M:%S}'
    record = {'host': socket.gethostname(), 'pid': os.getpid(), 'boot': _boot_id(), 'since': now, 'renewed': now,
              'lease_s': lease_s, 'token': uuid.uuid4().hex}
    seen, announced = None, False  # (tag, first seen at): the version whose renewal we wait for.
    while True:
      start = time.monotonic()
      try:
        return cls(workdir, lease_s, record, lease.create(url, cls._bytes(record)))._started(start)
      except lease.Conflict:
        pass
      got = lease.read(url)
      if got is None:
        continue  # Released meanwhile.
      data, tag = got
      holder = _holder(data)
      if holder.get('token') == record['token']:  # Our create landed; its answer was lost and retried.
        return cls(workdir, lease_s, record, tag)._started(start)
      expired = seen is not None and seen[0] == tag and time.monotonic() - seen[1] >= lease_s
      if seen is not None and seen[0] != tag:
        return (f'--workdir={workdir} is in use by another run ({_describe(holder)}; it renews its lease): wait for '
                'it to finish or stop it, or choose another --workdir')
      if expired or _dead_here(holder):
        start = time.monotonic()
        try:
          new = lease.replace(url, cls._bytes(record), tag)
        except lease.Conflict:
          continue  # Renewed or taken meanwhile: look again.
        why = 'its process is gone' if not expired else f'its lease was not renewed for {lease_s:g}s'
        logging.warning('Took over the lock of %s from %s (%s).', workdir, _describe(holder), why)
        return cls(workdir, lease_s, record, new)._started(start)
      if seen is None:
        seen = (tag, time.monotonic())
      if not announced:
        announced = True
        logging.warning('%s is locked by %s: waiting up to %gs for its lease to be renewed (then this run is '
                        'refused) or to expire (then this run takes over).', workdir, _describe(holder), lease_s)
      time.sleep(min(1.0, lease_s / 10))

  @staticmethod
  def _bytes(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()

  def _started(self, write_start: float) -> '_BucketLease':
    self.ok_at = write_start
    threading.Thread(target=self._renew_loop, name='workdir-lease', daemon=True).start()
    atexit.register(self.release)
    return self

  def _renew_loop(self) -> None:
    period = self.lease_s / 3
    wait = period
    while not self.done.wait(wait):
      with self.mutex:
        if self.done.is_set():
          return
        start = time.monotonic()
        self.record['renewed'] = f'{datetime.datetime.now():%Y-%m-%d %H:%M:%S}'
        try:
          self.tag = lease.replace(self.url, self._bytes(self.record), self.tag)
          self.ok_at, wait = start, period
          continue
        except lease.Conflict:
          got = _read_quietly(self.url)
          self._stop(f'another run took over the lock of --workdir={self.workdir} '
                     f'({_describe(_holder(got[0])) if got else "and released it"}): this run stops so that only '
                     'one writes; its newest checkpoint stays usable')
        except Exception as e:  # The store did not answer: retry until the lease would lapse.
          if time.monotonic() - self.ok_at >= self.lease_s * 0.8:
            self._stop(f'could not renew the lock of --workdir={self.workdir} within its {self.lease_s:g}s lease '
                       f'({e}): this run stops before another may take over; rerun it when storage answers')
          wait = min(1.0, period)

  def _stop(self, line: str) -> None:
    """Ends the process now: the main thread may be writing, and must not write on."""
    if claim_line():  # Else another thread is printing the run's one line: end without a second.
      print(f'error: {line}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)

  def release(self) -> None:
    """Deletes the lock if it is still ours (on a clean exit; a killed holder leaves its lease to expire)."""
    self.done.set()
    if health.failing():  # Each request would wait out the clients' retries: leave the lease to expire.
      return
    with self.mutex:
      got = _read_quietly(self.url)
      if got is None or got[1] != self.tag:
        return
      try:
        lease.delete(self.url, self.tag)
      except (lease.Conflict, UserError) as e:
        logging.warning('Could not release the lock of %s (%s): the next run waits for its lease.', self.workdir, e)


def _read_quietly(url: str):
  """The lock's (bytes, tag), or None when it is gone or unreadable (for messages and release only)."""
  try:
    return lease.read(url)
  except UserError:
    return None


def absolute(workdir: str) -> str:
  """A local workdir made absolute; a URL unchanged (`os.path.abspath` would make `gs://b` a `./gs:/b` folder)."""
  return workdir if storage.is_url(workdir) else os.path.abspath(workdir)


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
  if not storage.exists(path):
    return None
  try:
    saved = json.loads(storage.read_text(path))
    if not isinstance(saved, dict):
      raise ValueError('not a JSON object')
    return saved
  except (OSError, ValueError) as e:
    logging.warning('%s is unreadable (%s): not comparing the config with the previous run; the checkpoints\' '
                    'own fingerprint still guards the resume.', path, e)
    return None


def _frozen_refusal(workdir: str, frozen: dict) -> str:
  what = ', '.join(f'{setting(k)} {a!r} -> {b!r}' for k, (a, b) in frozen.items())
  values = ' '.join(f'{setting(k)}={a}' for k, (a, _) in frozen.items())
  return (f'--workdir={workdir} holds a run with another config: {what}. These change the data stream or the model, '
          f'so its checkpoints cannot continue this run: rerun with {values}, or use a new --workdir')


@dataclasses.dataclass
class Start:
  """What process 0 decided about starting in a workdir; `record` writes it once the start is accepted."""
  workdir: str
  config: Any
  entry: dict | None = None  # The config_history.jsonl entry (without its step), if anything changed.

  def record(self, step: int | None) -> None:
    """Writes config.json and the history entry (at the restored `step`), on process 0. Eval-only leaves both
    as training left them: it changes nothing of the run."""
    import jax
    if jax.process_index() != 0 or self.config.eval_only:
      return
    if self.entry is not None and step is not None:
      history = storage.join(self.workdir, HISTORY)
      entry = dict(time=round(datetime.datetime.now().timestamp(), 3), step=step, **self.entry)
      try:
        storage.append_text(history, json.dumps(entry) + '\n')
      except OSError as e:
        raise UserError(f'cannot write {history} ({e.strerror}): make the workdir writable') from None
      changes = ', '.join(f'{k} {v["from"]!r} -> {v["to"]!r}' for k, v in entry['changes'].items())
      if 'data' in entry:
        changes = ', '.join(filter(None, (changes, f'data {entry["data"]["from"]} -> {entry["data"]["to"]}')))
      logging.info('Config changed on resume at step %d: %s (recorded in %s)', step, changes, HISTORY)
    path = storage.join(self.workdir, 'config.json')
    try:
      if storage.is_url(path):  # One object write: atomic.
        storage.write_text(path, self.config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
      else:
        with open(path, 'w') as f:
          f.write(self.config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
    except OSError as e:
      raise UserError(f'cannot write {path} ({e.strerror}): remove whatever is in its place, or choose another '
                      '--workdir') from None


def decide(workdir: str, config, newest, current: dict, compare) -> Start:
  """Judges a start before anything is written; raises the refusal on every process.

  Process 0 compares this config with the newest checkpoint's record (`newest()` -> (step, meta) or
  (None, None); `current`: this run's fingerprint; `compare`: `checkpoints.compare`) and with config.json.
  The checkpoint is the truth for the frozen fields it records (so the check works without config.json, and
  a config.json that disagrees cannot lock the run out); config.json stands in for fields older checkpoints
  lack, and gives the other changes for `config_history.jsonl`.
  """
  import jax
  start, refusal = Start(workdir, config), ''
  step, meta = newest()  # On every process: Orbax's restore synchronizes them.
  if jax.process_index() == 0 and step is not None:
    refusal = _judge(start, step, meta, current, compare)
  if not _process_0_says(not refusal):
    raise UserError(refusal or f'process 0 refused to start in --workdir={workdir} with this config (see its error)')
  return start


def _judge(start: Start, step: int, meta: dict, current: dict, compare) -> str:
  """The refusal line of resuming checkpoint `step` (its `meta`) with `start.config`, or '' (then `start.entry`
  holds what changed)."""
  workdir, config = start.workdir, start.config
  path = storage.join(workdir, 'config.json')
  now = json.loads(config.to_json_best_effort(sort_keys=True))
  saved = _read_config(path)
  if saved is None and not storage.exists(path):
    logging.warning('%s is missing: comparing this config with checkpoint %d\'s record only (frozen fields, data); '
                    'other changes go unrecorded this time.', path, step)
  recorded = dict(meta.get('config', {}), **{k: meta[k] for k in ('model', 'dataset') if k in meta})
  if 'config' not in meta or 'data' not in meta:
    logging.info('Checkpoint %d predates the record of frozen fields and data: comparing only what it records%s.',
                 step, ' (and config.json)' if saved is not None else '')
  frozen = {}
  for k in FROZEN:
    if k not in now:
      continue
    if k in recorded:
      if saved is not None and k in saved and saved[k] != recorded[k] and now[k] == recorded[k]:
        logging.warning('%s says %s=%r, but checkpoint %d was trained with %r (this run\'s value): following the '
                        'checkpoint.', path, k, saved[k], step, recorded[k])
      if recorded[k] != now[k]:
        frozen[k] = (recorded[k], now[k])
    elif saved is not None and k in saved and saved[k] != now[k]:
      frozen[k] = (saved[k], now[k])
  if frozen:
    return _frozen_refusal(workdir, frozen)
  refusal, data_change = compare(storage.join(absolute(workdir), 'checkpoints'), step, meta, current,
                                 allow_data_change=bool(config.get('allow_data_change', False)),
                                 eval_only=bool(config.get('eval_only', False)))
  if refusal:
    return refusal
  changes = {}
  if saved is not None:
    changes = {k: {'from': saved.get(k, _MISSING), 'to': now.get(k, _MISSING)}
               for k in sorted(set(saved) | set(now))
               if saved.get(k, _MISSING) != now.get(k, _MISSING) and not (k in recorded and k in FROZEN)}
  if changes or data_change:
    start.entry = {'changes': changes, **({'data': data_change} if data_change else {})}
  return ''

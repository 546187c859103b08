"""The processes of one job must run the same job: they compare their config and their data before the first step.

Two processes started with another `--config.learning_rate`, or on folders that differ by one file, would
otherwise train diverging "replicated" states, or fail much later in a collective with misleading advice.
Each stage ('config', then 'data') goes through JAX's coordination service (the key-value store of the
distributed client `jax.distributed.initialize` started): every process publishes its record, process 0
compares each peer's with its own and publishes the verdict, and every process reads it, so all of them stop
with the same one line within seconds. The verdict key is written once (no overwrite): a process that gives
up waiting, or fails before training (`stopped`), writes it first, and every other process reads that
instead of waiting for a peer that will never report. Every wait is bounded (`--distributed_timeout`).
Single-process runs skip all of it.
"""

import json
import math
import sys
import time
from collections.abc import Callable

from absl import logging

from errors import UserError, first_line, setting

# Config fields that may differ per host: where this host's copy of the data sits, how many host threads read
# it, whether this host may download it when missing, and host-memory tuning. None of them changes the math:
# the data itself is compared by its identity (the 'data' stage), wherever it sits.
PER_HOST = ('data_dir', 'data_threads', 'download', 'huge_pages')
STAGES = ('config', 'data')
_PREFIX = 'dptrain/agree'
_POLL_MS = 500  # One blocking get at most this long, then a look at the verdict: a stopped peer ends the wait.
_MISSING = '<absent>'
_decided = set()  # Stages this process has a verdict for (`stopped` leaves them alone).


class PeerLost(UserError):
  """Another process of the job died, stopped or hung mid-run. The process should exit without JAX's shutdown
  barrier: that barrier waits for the lost peer and then aborts from C++ (a stack dump after the one line)."""


# --- what is compared (pure functions: the unit tests call them directly) -----------------------------------
def config_record(config) -> dict:
  """The resolved config as JSON values, without the `PER_HOST` fields."""
  resolved = json.loads(config.to_json_best_effort(sort_keys=True))
  return {k: v for k, v in resolved.items() if k not in PER_HOST}


def data_record(source) -> dict:
  """The data's identity (counts per split, class names, location-free digest) and, for messages only, where
  this host reads it."""
  return dict(source.identity(), where=source.description)


def _show(value) -> str:
  if value == '':
    return "''"
  return str(tuple(value) if isinstance(value, list) else value)


def config_difference(ref: dict, theirs: dict, peer: int) -> str:
  """The refusal line when process `peer`'s config record differs from process 0's (`ref`), or ''."""
  keys = [k for k in sorted(set(ref) | set(theirs)) if ref.get(k, _MISSING) != theirs.get(k, _MISSING)]
  if not keys:
    return ''
  k, rest = keys[0], keys[1:]
  also = ''
  if rest:
    named = ', '.join(setting(r) for r in rest[:4]) + (f' and {len(rest) - 4} more' if len(rest) > 4 else '')
    also = f' (also differ: {named})'
  return (f'the processes disagree: process {peer} has {setting(k)}={_show(theirs.get(k, _MISSING))}, process 0 '
          f'has {_show(ref.get(k, _MISSING))}{also}: start every process with the same config file and --config '
          'overrides')


def data_difference(ref: dict, theirs: dict, peer: int) -> str:
  """The refusal line when process `peer`'s data record differs from process 0's (`ref`), or ''."""
  mine, other = list(ref.get('classes', ())), list(theirs.get('classes', ()))
  if len(mine) != len(other):
    what = f'{len(other)} vs {len(mine)} classes'
  elif mine != other:
    k = next(k for k, (a, b) in enumerate(zip(other, mine, strict=True)) if a != b)
    what = f'class {k} named {other[k]!r} vs {mine[k]!r}'
  elif ref.get('examples') != theirs.get('examples'):
    a, b = theirs.get('examples', {}), ref.get('examples', {})
    what = ', '.join(f'{a.get(s)} vs {b.get(s)} {s} examples' for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s))
  elif ref.get('digest') != theirs.get('digest'):
    what = (f'the same example counts and classes, but other files or content: digest '
            f'{str(theirs.get("digest"))[:12]} vs {str(ref.get("digest"))[:12]}')
  else:
    return ''
  return (f'the data on process {peer} differs from process 0 ({what}; {theirs.get("where")} vs {ref.get("where")}): '
          f'give every host the same copy of the data ({setting("data_dir")} may differ per host)')


# --- the exchange ----------------------------------------------------------------------------------------------
def _state():
  """JAX's distributed state when this is a multi-process job, else None. Never starts the backend."""
  from jax._src import distributed
  s = distributed.global_state
  return s if s.client is not None and s.num_processes > 1 else None


def _key(stage: str, who) -> str:
  return f'{_PREFIX}/{stage}/{who}'


def _verdict_now(client, stage: str) -> str | None:
  try:
    return client.key_value_try_get(_key(stage, 'verdict'))
  except Exception:  # NOT_FOUND: nobody decided yet.
    return None


def _wait(client, key: str, stage: str, deadline: float):
  """('value', text) once `key` is set, ('verdict', line) if the stage was decided meanwhile, or None at the
  deadline."""
  while True:
    verdict = _verdict_now(client, stage)
    if verdict is not None:
      return 'verdict', verdict
    left_ms = math.ceil((deadline - time.monotonic()) * 1000)  # ceil: never give up before the deadline.
    if left_ms <= 0:
      return None
    try:
      return 'value', client.blocking_key_value_get(key, max(min(left_ms, _POLL_MS), 1))
    except Exception as e:
      if 'DEADLINE_EXCEEDED' not in str(e) and 'timed out' not in str(e).lower():
        raise PeerLost(f'lost contact with the job\'s coordination service while the processes compared their '
                       f'{stage} ({first_line(e)}): check the other processes\' logs, then restart every process') \
            from None


def _decide(client, stage: str, line: str) -> str:
  """Writes the stage's verdict unless one exists; returns the verdict that stands (first writer wins)."""
  _decided.add(stage)
  try:
    client.key_value_set(_key(stage, 'verdict'), line)
    return line
  except Exception:  # ALREADY_EXISTS: another process decided first.
    existing = _verdict_now(client, stage)
    return line if existing is None else existing


def _late(who: int, what: str, timeout_s: int) -> str:
  return (f'process {who} did not report {what} within {timeout_s}s (still starting, stuck, or running another '
          'version of this trainer): check its log, start every process with the same code, or raise '
          '--distributed_timeout')


def agree(stage: str, record: dict, difference: Callable[[dict, dict, int], str], timeout_s: int) -> None:
  """Publishes this process's `record` for `stage` and raises the job's verdict, the same line on every
  process, if any process differs (`difference(process 0's, peer's, peer)`), stopped, or never reported."""
  state = _state()
  if state is None:
    return
  client, me, n = state.client, state.process_id, state.num_processes
  what = {'config': 'its config', 'data': 'the identity of its data'}[stage]
  client.key_value_set(_key(stage, me), json.dumps(record, sort_keys=True), allow_overwrite=True)
  deadline = time.monotonic() + timeout_s
  if me == 0:
    line = ''
    for peer in range(1, n):
      got = _wait(client, _key(stage, peer), stage, deadline)
      if got is None:
        line = _late(peer, what, timeout_s)
      elif got[0] == 'verdict':
        line = got[1]
      else:
        line = difference(record, json.loads(got[1]), peer)
      if line:
        break
    verdict = _decide(client, stage, line)
  else:
    got = _wait(client, _key(stage, 0), stage, deadline)
    if got is None:
      verdict = _decide(client, stage, _late(0, what, timeout_s))
    elif got[0] == 'verdict':
      verdict = got[1]
    else:  # Process 0 reported; it decides within timeout_s of that (it waits for the slowest peer).
      got = _wait(client, _key(stage, 'verdict'), stage, time.monotonic() + timeout_s + 10)
      verdict = got[1] if got else _decide(client, stage, f'process 0 did not compare the processes\' {stage} '
                                                          f'within {timeout_s}s: check its log')
  _decided.add(stage)
  if verdict:
    raise UserError(verdict)
  if me == 0 and stage == 'config':
    logging.info('All %d processes run the same config (per host: %s).', n, ', '.join(PER_HOST))
  elif me == 0:
    logging.info('All %d processes read the same data (digest %s).', n, str(record.get('digest'))[:12])


def stopped(line: str) -> None:
  """Called as this process stops before training: decides every stage still open with "process I stopped"
  so its peers stop at once (with its line) instead of waiting for its records. No-op otherwise."""
  if 'jax' not in sys.modules:  # Stopped before JAX was even imported: no job was joined.
    return
  state = _state()
  if state is None:
    return
  for stage in STAGES:
    if stage not in _decided:
      _decide(state.client, stage, f'process {state.process_id} stopped before training ({line}): fix that and '
                                   'restart every process')


def peer_error(error: BaseException) -> bool:
  """True when `error` says that a collective or the coordination service lost another process (it died,
  stopped or hung), not that this process's own input or disk failed. Multi-process jobs only."""
  if _state() is None:
    return False
  text = str(error)
  markers = ('gloo', 'DEADLINE_EXCEEDED', 'coordination service', 'CoordinationService', 'another task',
             'heartbeat', 'AllGather', 'AllReduce', 'ReduceScatter', 'AllToAll', 'CollectivePermute', 'rendezvous',
             'Barrier timed out', 'barrier')
  return any(m.lower() in text.lower() for m in markers)


def lost_contact(during: str, error: BaseException) -> PeerLost:
  """The one line for a peer lost mid-run: where it happened, the library's words, and what to do."""
  detail = first_line(error, 10_000)
  detail = detail if len(detail) <= 160 else detail[:157] + '...'
  return PeerLost(f'lost contact with another process during {during} ({error.__class__.__name__}: {detail}): '
                   'check the other processes\' logs for why they stopped, then rerun the same command on every '
                   'process (it resumes from the last complete checkpoint)')

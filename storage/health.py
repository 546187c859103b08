"""A bound on how long a run waits for a storage endpoint that stopped answering.

Each client retries on its own (gcsfs: 6 tries, ~33 s per call; tensorstore: 6 tries, ~30 s; each Orbax step runs
several calls in a row), so a server that dies mid-run would stall a run for minutes, in whichever thread
happens to wait. Instead: the first failed request (gcsfs' retry hook, any storage call of ours that fails,
or the watchdog's own probe every `IDLE_PROBE_S`: a server that holds connections without answering fails no
request) arms a watchdog thread, which then asks the endpoint itself, one short request every `PROBE_EVERY_S`.
Any answer but a 5xx or 429 disarms it (a transient error: the clients' own retries carry on); no such answer
within `DOWN_S` of the first failure ends the process with one `error:` line (`errors.claim_line`, so it is
the only one), whatever the other threads wait for. The newest committed checkpoint is never touched by
this: a step half written when the process ends has no commit marker and is not resumed from.
"""

import os
import sys
import threading
import time
import urllib.error
import urllib.request

import storage
from errors import claim_line

DOWN_S = 60.0  # From the first failed request to the stop, when no probe got an answer meanwhile.
PROBE_EVERY_S = 2.0  # While armed.
IDLE_PROBE_S = 10.0  # While not: a server that holds connections open without answering fails no request.
PROBE_TIMEOUT_S = 5.0

_lock = threading.Lock()
_state = {'path': None, 'since': None, 'error': '', 'thread': None}


def watch(path: str) -> None:
  """Starts the watchdog for the bucket URL `path` (a workdir) in this process; idempotent."""
  with _lock:
    _state['path'] = path
    if _state['thread'] is not None:
      return
    _hook_gcsfs()
    if failed not in storage.FAILURE_HOOKS:
      storage.FAILURE_HOOKS.append(failed)
    _state['thread'] = threading.Thread(target=_loop, name='storage-watchdog', daemon=True)
    _state['thread'].start()


def failed(error: BaseException, at: float | None = None) -> None:
  """Records a failed storage request (arms the watchdog; the first failure's time and text are kept)."""
  with _lock:
    if _state['since'] is None:
      _state['since'] = time.monotonic() if at is None else at
      _state['error'] = f'{error.__class__.__name__}: {error}'.splitlines()[0][:160] if str(error) else \
          error.__class__.__name__


def failing() -> bool:
  """True from a failed request until the endpoint answers again (callers skip optional requests)."""
  return _state['since'] is not None and _state['thread'] is not None


def _hook_gcsfs() -> None:
  """gcsfs calls `retry.is_retriable` on every failed attempt it may retry: the earliest sign of an outage."""
  try:
    from gcsfs import retry
  except ImportError:
    return
  original = getattr(retry.is_retriable, '__wrapped_by_dptrain__', retry.is_retriable)

  def is_retriable(exception):
    ok = original(exception)
    if ok:
      failed(exception)
    return ok
  is_retriable.__wrapped_by_dptrain__ = original
  retry.is_retriable = is_retriable


def _answers(url: str) -> bool:
  """One short request to the endpoint: True on any answer but a 5xx or 429 (401/403/404 are answers)."""
  try:
    with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S):
      return True
  except urllib.error.HTTPError as e:
    return e.code < 500 and e.code != 429
  except (OSError, ValueError):
    return False


def probe_url(path: str) -> str:
  return f'{storage.endpoint(path).rstrip("/")}/storage/v1/b/{storage.bucket(path)}'


def _loop() -> None:
  idle_probe = time.monotonic() + IDLE_PROBE_S
  while True:
    time.sleep(PROBE_EVERY_S if _state['since'] is not None else 0.5)
    since, path = _state['since'], _state['path']
    if since is None and time.monotonic() < idle_probe:
      continue
    idle_probe, started = time.monotonic() + IDLE_PROBE_S, time.monotonic()
    if _answers(probe_url(path)):
      with _lock:
        _state['since'] = None
    elif since is None:
      failed(TimeoutError(f'{storage.endpoint(path)} did not answer a probe within {PROBE_TIMEOUT_S:g}s'), started)
    elif time.monotonic() - since >= DOWN_S:
      stop(path, time.monotonic() - since, _state['error'])


def stop(path: str, waited_s: float, error: str) -> None:
  """The one line, then the end of the process (threads blocked in a client's retries are not waited for)."""
  if claim_line():
    e = ConnectionError(f'no answer from {storage.endpoint(path)} for {waited_s:.0f}s since the first failed '
                        f'request, {error}')
    line = str(storage.storage_error(path, e, 'reach', limit=400)).removesuffix(', then rerun')
    print(f'error: {line}, then rerun the same command (it resumes from the last complete checkpoint)',
          file=sys.stderr, flush=True)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(2)

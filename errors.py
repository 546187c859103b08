"""The one exception type that means "the user gave us something wrong", and how messages name a setting.

`train.py` prints a `UserError` as a single line (no traceback) and exits 2; anything else is a bug and
keeps its traceback. Raise it with a message that says what is wrong *and* how to fix it.
"""

import threading

_line = threading.Lock()


class UserError(Exception):
  """Bad config, flags, data files, checkpoints or topology: reported as one clear line."""


def setting(key: str) -> str:
  """How a message names config field `key`: the command-line override form (`--config.KEY`).

  The one place that decides the wording of settings in messages: library modules call this instead of
  spelling the flag themselves, so a different front end changes it here alone.
  """
  return f'--config.{key}'


def first_line(e: BaseException, limit: int = 200) -> str:
  """An exception's first message line, capped: enough to identify a cause in a one-line error."""
  text = str(e).strip()
  return text.splitlines()[0][:limit] if text else e.__class__.__name__


def claim_line() -> bool:
  """True for the first caller only: of the threads that may end a run with an `error:` line (the main
  thread, the workdir lease, the storage watchdog), one prints, so a run never ends with two."""
  return _line.acquire(blocking=False)

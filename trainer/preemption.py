"""SIGTERM, SIGHUP, SIGUSR1 or SIGINT (Ctrl-C) -> checkpoint at the next step boundary, one line, exit 0.

SIGHUP is a closed terminal or a dropped SSH session; SIGUSR1 is Slurm's pre-timeout warning
(`--signal=USR1@SECONDS`): both save and stop like a SIGTERM, so a rerun (or Slurm's requeue) resumes there.

`install()` runs first thing in train.py, before its heavy imports, so no moment of the run is left with
the default handler (exit 143, no message):
  - imports: exits at once with one line (nothing is open yet);
  - start-up (loading, compiling): the run stops at once with `Stopped`: there is nothing new to save;
  - training: a flag, read at every step boundary, where the loop saves and stops;
  - after the last step (final save, plot): noted; the run finishes, then says so.
A second Ctrl-C exits at once. Multi-process: `jax.distributed.initialize` takes SIGTERM over for JAX's
preemption sync, which makes all processes agree on one step and save together; a Ctrl-C, SIGHUP or SIGUSR1
is forwarded to it as a SIGTERM.
"""

import os
import signal
import sys

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_phase = 'importing'  # -> 'startup' (train.py's run) -> 'training' -> 'finishing'
_received = None  # Name of the first signal received, e.g. 'SIGTERM'.


class Stopped(BaseException):
  """A signal arrived before training started. A BaseException, so no `except Exception` swallows it."""


def install() -> None:
  """Called by train.py before its heavy imports (this module imports no JAX at load time)."""
  for sig in _SIGNALS:
    signal.signal(sig, _on_signal)


def starting() -> None:
  """From here on a signal during start-up raises `Stopped` (caught by train.py) instead of exiting at once."""
  global _phase
  _phase = 'startup'


# Frames where an exception from the handler would be "ignored" (printed with a traceback) rather than raised.
_CALLBACK_FRAMES = ('_xla_gc_callback',)


def received():
  """The name of the signal that asked the run to stop, or None."""
  return _received


def _on_signal(signum, frame):
  global _received
  name = signal.Signals(signum).name
  if signum == signal.SIGINT and _received == 'SIGINT':
    print('Second Ctrl-C: exiting at once, without saving.', file=sys.stderr, flush=True)
    os._exit(130)
  _received = _received or name
  if _phase == 'importing':  # Nothing is open or written yet.
    say(_stopped_line(name))
    os._exit(0)
  if _phase == 'startup':
    if frame is not None and frame.f_code.co_name in _CALLBACK_FRAMES:
      return  # Python would print and drop an exception raised in a gc callback; the flag stops the run.
    raise Stopped(name)
  import jax
  if signum != signal.SIGTERM and _phase == 'training' and jax.process_count() > 1:
    os.kill(os.getpid(), signal.SIGTERM)  # Into JAX's preemption sync: all processes stop at one step.


def say(line: str) -> None:
  """Prints `line` to stdout; after a SIGHUP the terminal may be gone (EIO, EPIPE): then the rest of the output
  goes to /dev/null, so that the checkpoint already saved still ends the run with exit 0."""
  try:
    print(line, flush=True)
  except OSError:
    sys.stdout = open(os.devnull, 'w')


def _stopped_line(name: str) -> str:
  return f'Stopped ({name}) during start-up, before the first step: nothing new to save; rerun the same command.'


def stopped_line(e: Stopped) -> str:
  return _stopped_line(str(e))


class PreemptionWatcher:
  """Marks the training phase for the signal handler; says at which step boundary to save and stop."""

  def __init__(self):
    import jax
    global _phase, _received
    if _phase == 'finishing':  # An earlier run in this process (library use) ended: start afresh.
      _received = None
    self._multi = jax.process_count() > 1
    self._restore = {}
    if not self._multi:  # Library use (no train.py): handle the signals for the loop's lifetime only.
      self._restore = {s: signal.signal(s, _on_signal) for s in _SIGNALS if signal.getsignal(s) is not _on_signal}
    _phase = 'training'

  def reached(self, step: int) -> bool:
    """True at the step boundary where every process should save and stop."""
    if self._multi:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return _received is not None

  def close(self) -> None:
    global _phase
    _phase = 'finishing'
    for sig, previous in self._restore.items():
      signal.signal(sig, previous)

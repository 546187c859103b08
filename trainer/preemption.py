"""SIGTERM -> checkpoint at the next step boundary and exit 0.

Single process: our own SIGTERM handler sets a flag. Multi-process: JAX's preemption sync manager (set up
by `jax.distributed.initialize`) makes all processes agree on the same step, so they save together.
"""

import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:

  def __init__(self):
    self._requested = False
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    self._requested = True

  def reached(self, step: int) -> bool:
    """True at the step boundary where every process should save and stop."""
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self) -> None:
    if not self._multi:
      signal.signal(signal.SIGTERM, self._previous)

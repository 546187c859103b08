"""Periodic actions of the train loop (log, eval, checkpoint, profile, ...): one mechanism, one line each.

Compare big_vision's `u.itstime` and Levanter's `add_hook(every=N)`. Work that must happen inside the
compiled step (EMA, gradient accumulation) does not belong here.
"""

import dataclasses
import time
from typing import Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Periodic:
  """Runs `fn(step)` at every multiple of `every` (never when `every` <= 0) and, if `at_end`, at the last step.

  `aside`: time spent in it is not training (eval, checkpoints), so throughput windows leave it out.
  """
  name: str
  every: int
  fn: Callable[[int], None]
  at_end: bool = True
  aside: bool = True

  def due(self, step: int, last_step: int) -> bool:
    return (self.every > 0 and step % self.every == 0) or (self.at_end and step == last_step)


def run_due(actions: Iterable[Periodic], step: int, last_step: int) -> float:
  """Runs the actions due at `step`, in order; returns the seconds spent in `aside` ones."""
  aside = 0.0
  for action in actions:
    if action.due(step, last_step):
      t = time.perf_counter()
      action.fn(step)
      if action.aside:
        aside += time.perf_counter() - t
  return aside

"""Periodic actions of the train loop (log, eval, checkpoint, profile, ...): one mechanism, one line each.

Compare big_vision's `u.itstime` and Levanter's `add_hook(every=N)`. Work that must happen inside the
compiled step (EMA, gradient accumulation) does not belong here.
"""

import dataclasses
import time
from typing import Callable, Iterable, Iterator


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


def next_due(actions: Iterable[Periodic], step: int, last_step: int) -> int:
  """The first step after `step` at which some action is due (`last_step` if none is before it)."""
  nxt = last_step
  for action in actions:
    if action.every > 0:
      nxt = min(nxt, (step // action.every + 1) * action.every)
  return nxt


def dispatch_sizes(actions: Iterable[Periodic], start: int, last_step: int, k: int) -> Iterator[int]:
  """Steps per dispatch from `start` to `last_step` (`steps_per_dispatch` = k): blocks of k, and single steps
  where a block would cross a step at which an action is due, so every action still runs at exactly its step
  and only two programs compile (1 step and k steps). The loop and its feed both follow this plan."""
  actions = list(actions)
  step = start
  while step < last_step:
    n = next_due(actions, step, last_step) - step
    blocks = n // k if k > 1 else 0
    for _ in range(blocks):
      yield k
    for _ in range(n - blocks * k):
      yield 1
    step += n

"""Periodic actions of the train loop (log, eval, checkpoint, profile, ...): one mechanism, one line each.

Compare big_vision's `u.itstime` and Levanter's `add_hook(every=N)`. Work that must happen inside the
compiled step (EMA, gradient accumulation) does not belong here. A config adds its own actions by import path
(`config.hooks`, see `from_config` and `StepInfo`).
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import plugins
from errors import UserError, setting


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


@dataclasses.dataclass
class StepInfo:
  """What a config's hook (`config.hooks`) receives, once per due step.

  `train` / `eval`: the newest train log and eval events (the dicts written to metrics.jsonl), or None before
  the first. `state` is the canonical train state (params, batch_stats, opt_state, ema_params, step),
  fetched on first use; reading it does not change training. `record(**values)` appends
  `{'kind': 'hook', 'hook': NAME, 'step': STEP, **values}` to metrics.jsonl (numbers also to TensorBoard).
  Hooks run on every process (`is_main`: process 0, the one that writes files).
  """
  name: str
  step: int
  epoch: float
  workdir: str
  config: Any
  is_main: bool
  train: dict | None
  eval: dict | None
  _state: Callable[[], Any]
  _write: Callable[[dict], None]

  @functools.cached_property
  def state(self):
    return self._state()

  def record(self, **values) -> None:
    self._write({'kind': 'hook', 'hook': self.name, 'step': self.step, **values})


def parse(spec: str) -> list[tuple[str, int]]:
  """`config.hooks` = 'MODULE:ATTR@EVERY,...' -> [(MODULE:ATTR, EVERY)]; EVERY 0 = at the last step only."""
  out = []
  for item in (s.strip() for s in spec.split(',')):
    if not item:
      continue
    path, sep, every = item.rpartition('@')
    if not sep or not plugins.is_path(path) or not every.strip().isdigit():
      raise UserError(f"{setting('hooks')}={spec!r}: {item!r} is invalid: give 'MODULE:ATTR@EVERY' items, comma "
                      "separated, e.g. 'my_hooks:log_norm@100' (EVERY steps; 0 = at the last step only)")
    out.append((path.strip(), int(every)))
  return out


def resolve(spec: str) -> list[tuple[str, Callable, int]]:
  """[(name, fn, every)] of `config.hooks`; each fn a callable of one argument (a `StepInfo`)."""
  out = []
  for path, every in parse(spec):
    fn = plugins.resolve(path, 'hooks')
    names, var = plugins.keywords(fn) if callable(fn) else ((), False)
    if not callable(fn) or (len(names) < 1 and not var):
      raise UserError(f'{setting("hooks")}: {path} is not a function of one argument: define '
                      f'`def {path.rpartition(":")[2].split(".")[-1]}(info)` (info: trainer.hooks.StepInfo)')
    out.append((path, fn, every))
  return out


def from_config(config, info: Callable[[str, int], StepInfo]) -> list[Periodic]:
  """The `Periodic` actions of `config.hooks`, each called with `info(name, step)`; they run after the
  built-in actions at a step, in the order given, at their multiples and at the last step."""
  def action(name, fn, every):
    return Periodic(name, every, lambda step: fn(info(name, step)))
  return [action(name, fn, every) for name, fn, every in resolve(config.hooks)]

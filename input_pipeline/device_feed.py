"""Host batches -> device arrays in the step's layout, placed ahead of time.

`prefetch` keeps `depth` batches already transferred, so the step never waits on a host-to-device copy
(works for both layouts, unlike a pmap-only prefetch).
"""

import collections
import time
from typing import Callable, Iterable, Iterator


class Prefetcher:
  """Iterates `put(batch)` for each host batch, `depth` ahead; `wait_s` totals the time spent blocked."""

  def __init__(self, batches: Iterable, put: Callable, depth: int = 2):
    self._it, self._put, self._depth = iter(batches), put, max(depth, 1)
    self._queue = collections.deque()
    self.wait_s = 0.0

  def _fill(self):
    while len(self._queue) < self._depth:
      try:
        self._queue.append(self._put(next(self._it)))
      except StopIteration:
        return

  def __iter__(self) -> Iterator:
    return self

  def __next__(self):
    t = time.perf_counter()
    self._fill()
    if not self._queue:
      raise StopIteration
    batch = self._queue.popleft()
    self._fill()
    self.wait_s += time.perf_counter() - t
    return batch

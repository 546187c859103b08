"""Host batches -> device arrays in the step's layout, placed ahead of time on a background thread.

`Prefetcher` keeps up to `depth` batches already transferred, so the train step never waits on tf.data or
on a host-to-device copy; it works for both layouts (the Flax prefetch helper only fits pmap's).
"""

import queue
import threading
import time
from typing import Callable, Iterable

_END = object()


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher:
  """Iterates `put(batch)` for each host batch, up to `depth` ahead; `wait_s` totals the time blocked."""

  def __init__(self, batches: Iterable, put: Callable, depth: int = 2):
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self.wait_s = 0.0
    self._done = False
    self._thread = threading.Thread(target=self._produce, args=(iter(batches), put), daemon=True,
                                    name='device_prefetch')
    self._thread.start()

  def _produce(self, it, put):
    try:
      for batch in it:
        if not self._offer(put(batch)):
          return
      self._offer(_END)
    except BaseException as e:  # Re-raised in the consumer's thread, where it can be reported.
      self._offer(_Failure(e))

  def _offer(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    t = time.perf_counter()
    item = self._queue.get()
    self.wait_s += time.perf_counter() - t
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = True
      raise item.error
    return item

  def close(self) -> None:
    """Stops the background thread (for an early exit: preemption, divergence)."""
    self._stop.set()
    self._thread.join(timeout=5)

  def __del__(self):
    self._stop.set()

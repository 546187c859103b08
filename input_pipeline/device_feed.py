"""Host batches -> device arrays in the step's layout, placed ahead of time on a background thread.

`Prefetcher` keeps up to `depth` batches already transferred, so the train step never waits on tf.data or
on a host-to-device copy; it works for both layouts (the Flax prefetch helper only fits pmap's).
`from_dataset` pulls several steps' batches per tf.data element: each element costs ~100-600 µs of Python
and iterator overhead whatever its size, which dominated the step of small models (benchmarks/host_overhead.py).
"""

import queue
import threading
import time
from typing import Callable, Iterable

import numpy as np

CHUNK_BYTES = 4 << 20  # Bytes of batches per tf.data element, at most (and at most MAX_CHUNK steps).
MAX_CHUNK = 16

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


def steps_per_element(element_spec, chunk_bytes: int = CHUNK_BYTES) -> int:
  """How many steps' batches one tf.data element may hold: 1 when a shape is unknown or a batch is large."""
  sizes = []
  for spec in _leaves(element_spec):
    if not spec.shape.is_fully_defined():
      return 1
    sizes.append(int(np.prod(spec.shape)) * spec.dtype.size)
  return int(max(1, min(MAX_CHUNK, chunk_bytes // max(sum(sizes), 1))))


def _leaves(tree):
  return [leaf for value in tree.values() for leaf in _leaves(value)] if isinstance(tree, dict) else [tree]


def _split(chunks: Iterable) -> Iterable:
  """Elements of stacked batches [k, ...] -> the k batches, as numpy views (no copies)."""
  for chunk in chunks:
    for i in range(len(next(iter(chunk.values())))):
      yield {name: value[i] for name, value in chunk.items()}


def from_dataset(ds, put: Callable, depth: int = 2) -> Prefetcher:
  """A `Prefetcher` over a tf.data dataset of batch dicts, pulling several steps per element (same order)."""
  k = steps_per_element(ds.element_spec)
  if k == 1:
    return Prefetcher(ds.as_numpy_iterator(), put, depth)
  return Prefetcher(_split(ds.batch(k).as_numpy_iterator()), put, depth)

"""Host batches -> device arrays in the step's layout, placed ahead of time on a background thread.

`Prefetcher` keeps up to `depth` batches already transferred, so the train step never waits on tf.data or
on a host-to-device copy; it works for both layouts (the Flax prefetch helper only fits pmap's).
`from_dataset` pulls several steps' batches per tf.data element: each element costs ~100-600 µs of Python
and iterator overhead whatever its size, which dominated the step of small models (benchmarks/host_overhead.py).
"""

import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable

import numpy as np

CHUNK_BYTES = 4 << 20  # Bytes of batches per tf.data element, at most (and at most MAX_CHUNK steps).
MAX_CHUNK = 64

_END = object()


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher:
  """Iterates `put(batch)` for each host batch, up to `depth` ahead; `wait_s` totals the time blocked."""

  def __init__(self, batches: Iterable, put: Callable, depth: int = 2, each: bool = False):
    """`each`: `put` returns a list of device batches per input item (several steps placed at once), which
    are served one by one; `depth` then counts those lists."""
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self.wait_s = 0.0
    self._done = False
    self._each = each
    self._ready = collections.deque()
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
    if self._ready:
      return self._ready.popleft()
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
    if self._each:
      self._ready.extend(item)
      return self._ready.popleft()
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
  return steps_for_bytes(sum(sizes), chunk_bytes)


def steps_for_bytes(batch_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
  """Steps of `batch_bytes` each that one element may hold (at most `MAX_CHUNK`)."""
  return int(max(1, min(MAX_CHUNK, chunk_bytes // max(batch_bytes, 1))))


def _leaves(tree):
  return [leaf for value in tree.values() for leaf in _leaves(value)] if isinstance(tree, dict) else [tree]


def _split(chunks: Iterable) -> Iterable:
  """Elements of stacked batches [k, ...] -> the k batches, as numpy views (no copies)."""
  for chunk in chunks:
    for i in range(len(next(iter(chunk.values())))):
      yield {name: value[i] for name, value in chunk.items()}


def stacked(batches: Iterable, k: int) -> Iterable:
  """Per-step batches -> up to `k` of them stacked on a new leading axis (the last group may be shorter)."""
  it = iter(batches)
  while group := list(itertools.islice(it, k)):
    yield {name: np.stack([b[name] for b in group]) for name in group[0]}


def grouped(batches: Iterable, sizes: Iterable[int]) -> Iterable:
  """Per-step batches -> (size, batch) for each dispatch size: the batch itself for 1, else `size` batches
  stacked on a new leading axis (`steps_per_dispatch`). Ends when either input does."""
  it = iter(batches)
  for size in sizes:
    group = list(itertools.islice(it, size))
    if len(group) < size:
      return
    yield size, group[0] if size == 1 else {name: np.stack([b[name] for b in group]) for name in group[0]}


def _regroup(chunks: Iterable, sizes: Iterable[int]) -> Iterable:
  """Elements of stacked batches [c, ...] -> (size, batch) per dispatch size, as `grouped` yields, but as
  numpy views of the elements wherever a group lies inside one (no per-step dicts, no stacking copies)."""
  it = iter(chunks)
  chunk, pos, length = None, 0, 0
  for size in sizes:
    parts, need = [], size
    while need:
      if pos == length:
        chunk = next(it, None)
        if chunk is None:
          return
        pos, length = 0, len(next(iter(chunk.values())))
      take = min(need, length - pos)
      parts.append({name: value[pos:pos + take] for name, value in chunk.items()})
      pos, need = pos + take, need - take
    group = parts[0] if len(parts) == 1 else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    yield size, ({name: value[0] for name, value in group.items()} if size == 1 else group)


def from_dataset(ds, put: Callable, depth: int = 2, sizes: Iterable[int] | None = None,
                 put_each: Callable | None = None, stacked: bool = False) -> Prefetcher:
  """A `Prefetcher` over a tf.data dataset of batch dicts, pulling several steps per element (same order);
  `stacked`: the elements already hold several steps [k, ...] (`pipeline.train_dataset(steps_per_element=k)`).
  With `sizes`, it yields what `grouped` does and `put` takes (size, batch). `put_each` (stacked batches
  [k, ...] -> k placed batches) places a whole element at once; one element is then queued ahead."""
  k = 0 if stacked else steps_per_element(ds.element_spec)
  if k == 1:
    return Prefetcher(ds.as_numpy_iterator() if sizes is None else grouped(ds.as_numpy_iterator(), sizes), put,
                      depth)
  chunks = ds.as_numpy_iterator() if stacked else ds.batch(k).as_numpy_iterator()
  if sizes is not None:
    return Prefetcher(_regroup(chunks, sizes), put, depth)
  if put_each is not None:
    return Prefetcher(chunks, padded_each(put_each), 1, each=True)
  return Prefetcher(_split(chunks), put, depth)


def padded_each(put_each: Callable) -> Callable:
  """`put_each` that sees every element at the first element's length: a shorter one (the stream's tail) is
  padded by repeating its last step, and the extra batches are dropped. `put_each` compiles a split program
  per length, which the loop would wait on near its end (~0.2 s, benchmarks/host_overhead.py)."""
  full = None

  def place(chunk) -> list:
    nonlocal full
    n = len(next(iter(chunk.values())))
    full = n if full is None else full
    if n < full:
      chunk = {name: np.concatenate([v, np.repeat(v[-1:], full - n, axis=0)]) for name, v in chunk.items()}
    return put_each(chunk)[:n]
  return place

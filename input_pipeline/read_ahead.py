"""Reading a bucket's examples ahead of the decoders, in the order the pipeline will ask for them.

One example is one request (a ranged GET of a TFRecord record, a GET of an image file): a round trip of tens
of ms on Cloud Storage. Read inside tf.data's map, each request would hold a decode thread for its whole round
trip. But the order is a pure function of (seed, step, position), so the pipeline knows every example it will
need: `fetched` reads them `CHUNK` at a time (all of a chunk's requests in flight at once, `storage.read_many`)
on `IO_THREADS` threads of their own, `DEPTH` chunks ahead, and yields them in order. The decode threads
(`data_threads`) only decode; what the order guarantees is unchanged (the same bytes reach the same (index,
step)). Requests per example: still one.
"""

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CHUNK = 32      # Examples per batch of requests (and per element handed to tf.data: one Python call each).
IO_THREADS = 4  # Chunks fetched at once: 128 requests in flight, ~6000 examples/s at 20 ms a round trip.
DEPTH = 8       # Chunks read ahead: 256 examples' encoded bytes in memory (~30 MB of ImageNet JPEGs).


def fetched(fetch: Callable[[list[int]], list[bytes]], items: Iterable[tuple], *, chunk: int = CHUNK,
            threads: int = IO_THREADS, depth: int = DEPTH) -> Iterator[tuple]:
  """For `items` (index, other), in order, chunks (int64 indices [k], others [k], encoded bytes [k] as an
  object array) with k <= `chunk`; `fetch(indices)` returns their bytes. The next `depth` chunks are in flight;
  a failed fetch raises its error when its turn comes; closing the generator cancels what is still queued."""
  pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix='read-ahead')
  items = iter(items)
  pending = collections.deque()

  def submit() -> bool:
    part = list(itertools.islice(items, chunk))
    if part:
      index = np.asarray([p[0] for p in part], np.int64)
      pending.append((index, np.asarray([p[1] for p in part]), pool.submit(fetch, index.tolist())))
    return bool(part)

  try:
    while len(pending) < depth and submit():
      pass
    while pending:
      index, other, future = pending.popleft()
      submit()
      data = np.empty(len(index), object)
      data[:] = future.result()
      yield index, other, data
  finally:
    pool.shutdown(wait=False, cancel_futures=True)

"""read_ahead.fetched: the examples in the order asked, chunked, fetched ahead, errors at their turn."""

import threading
import time

import numpy as np
import pytest

from input_pipeline import read_ahead


def _fetch_log():
  calls, lock = [], threading.Lock()

  def fetch(indices):
    with lock:
      calls.append(list(indices))
    time.sleep(0.01 * (len(calls) % 3))  # Chunks finish out of order.
    return [f'x{i}'.encode() for i in indices]
  return fetch, calls


def test_order_chunks_and_payloads():
  fetch, calls = _fetch_log()
  items = [(i * 7 % 23, i) for i in range(50)]
  out = list(read_ahead.fetched(fetch, items, chunk=8, threads=3, depth=4))
  assert [len(c[0]) for c in out] == [8] * 6 + [2]
  index = np.concatenate([c[0] for c in out])
  other = np.concatenate([c[1] for c in out])
  data = np.concatenate([c[2] for c in out])
  assert index.tolist() == [i for i, _ in items] and other.tolist() == [s for _, s in items]
  assert data.tolist() == [f'x{i}'.encode() for i, _ in items]
  assert sorted(i for c in calls for i in c) == sorted(i for i, _ in items)  # Each example fetched once.


def test_reads_ahead_up_to_depth_chunks():
  fetch, calls = _fetch_log()
  gen = read_ahead.fetched(fetch, ((i, 0) for i in range(1000)), chunk=10, threads=2, depth=5)
  next(gen)
  time.sleep(0.2)
  assert 5 <= len(calls) <= 6, len(calls)  # depth chunks queued (one more once the first was taken), no more.
  gen.close()
  time.sleep(0.1)
  n = len(calls)
  time.sleep(0.1)
  assert len(calls) == n  # Closing stops the fetching.


def test_a_failed_fetch_raises_at_its_turn():
  def fetch(indices):
    if 13 in indices:
      raise OSError('no such object')
    return [b'ok'] * len(indices)
  gen = read_ahead.fetched(fetch, ((i, 0) for i in range(40)), chunk=5, threads=2, depth=4)
  assert len(next(gen)[0]) == 5 and len(next(gen)[0]) == 5  # 0..9 arrive; 10..14 holds the failure.
  with pytest.raises(OSError, match='no such object'):
    next(gen)


def test_bytes_ending_in_nul_reach_the_parser_whole():
  """A serialized tf.train.Example may end in 0x00; numpy's fixed-width bytes would drop it. Both ways fetched
  bytes enter tf.data (a numpy_function per example, the read-ahead generator) keep every byte."""
  from input_pipeline import base, pipeline
  from input_pipeline.tf_host import tf
  payloads = [b'rec' + b'\x00' * (i % 3 + 1) for i in range(5)]

  class Source:
    def fetcher(self, split):
      return lambda indices: [payloads[i] for i in indices]

    def parser(self, split):
      return lambda i, raw: raw

  read = base.fetched_reader(Source(), 'train')
  assert [read(tf.constant(i, tf.int64)).numpy() for i in range(5)] == payloads
  ds = pipeline._read_ahead(Source(), 'train', lambda: [(i, i) for i in range(5)], tf.int64)
  assert [raw for _, _, raw in ds.as_numpy_iterator()] == payloads

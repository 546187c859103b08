"""Conditional writes (storage/lease.py) against real fake-gcs-server and moto S3 servers: of racing creators
exactly one wins, a stale version is refused, the version read is the one written."""

import threading

import pytest

from storage import lease


@pytest.fixture(params=['gs', 's3'])
def root(request):
  return request.getfixturevalue({'gs': 'gcs_bucket', 's3': 's3_bucket'}[request.param])


def test_create_is_exclusive_and_replace_needs_the_current_version(root):
  url = f'{root}/w/.lock'
  assert lease.read(url) is None
  tag = lease.create(url, b'one')
  with pytest.raises(lease.Conflict):
    lease.create(url, b'two')
  assert lease.read(url) == (b'one', tag)
  new = lease.replace(url, b'three', tag)
  assert new != tag and lease.read(url) == (b'three', new)
  with pytest.raises(lease.Conflict):
    lease.replace(url, b'four', tag)  # A stale version: someone wrote since.
  assert lease.read(url) == (b'three', new)
  with pytest.raises(lease.Conflict):
    lease.replace(f'{root}/w/missing', b'x', new)
  if root.startswith('s3'):  # fake-gcs-server ignores ifGenerationMatch on DELETE (real Cloud Storage honours it).
    with pytest.raises(lease.Conflict):
      lease.delete(url, tag)
  lease.delete(url, new)
  assert lease.read(url) is None
  assert lease.create(url, b'again')


def test_of_concurrent_creators_exactly_one_wins(root):
  url = f'{root}/race/.lock'
  won, lost, barrier = [], [], threading.Barrier(8)

  def creator(i):
    barrier.wait()
    try:
      won.append((i, lease.create(url, str(i).encode())))
    except lease.Conflict:
      lost.append(i)
  threads = [threading.Thread(target=creator, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(won) == 1 and len(lost) == 7, (won, lost)
  assert lease.read(url) == (str(won[0][0]).encode(), won[0][1])

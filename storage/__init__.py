"""File operations on a local path or a bucket URL (`gs://`, `s3://`): the one place the trainer touches files.

Local paths use `os` (rename is atomic, append is append). URLs go through fsspec (gcsfs, s3fs), with what
each verb can promise on an object store:
  - `write_bytes` / `write_text`: one object write, so a reader sees the old or the new object, never half
    (the local equivalent: a temporary file renamed over the target);
  - `append_text`: a rewrite of the whole object (object stores have no append; metrics.jsonl stays one
    object, and small);
  - `move`: copy, then delete (no rename on object stores); `makedirs`: nothing (prefixes need no creation).
Every storage failure (a missing bucket, refused credentials, an unreachable endpoint) becomes one
`UserError` line naming the path and the fix.

`configure()` runs before Orbax, TFDS or tensorstore load: `etils.epath` (Orbax's and TFDS' file layer) is
told to use fsspec instead of `tf.io.gfile` (whose Cloud Storage endpoint is compiled in), and tensorstore
(Orbax's array writer) gets the endpoint of `STORAGE_EMULATOR_HOST` under its own name.
"""

import hashlib
import logging
import os
import re
import shutil
import sys
import threading

from errors import UserError

SCHEMES = ('gs', 's3')


def is_url(path: str) -> bool:
  return '://' in str(path)


def scheme(path: str) -> str:
  return str(path).split('://', 1)[0] if is_url(path) else ''


def configure() -> None:
  """Points the libraries that read and write for us at the same storage route as ours (see the module doc).
  A value the user set wins."""
  os.environ.setdefault('EPATH_USE_TF', 'false')
  gpath = sys.modules.get('etils.epath.gpath')
  if gpath is not None and hasattr(gpath, '_is_tf_installed'):  # epath caches its first answer for good.
    gpath._is_tf_installed.cache_clear()
  # gcsfs logs every failed request with its traceback before raising; the run reports the failure in one line.
  logging.getLogger('gcsfs').setLevel(logging.CRITICAL)
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  if emulator:
    url = emulator if '://' in emulator else f'http://{emulator}'
    os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', url)
    # gcsfs' zonal-bucket probe calls Google's storage-control API, which no emulator serves (one warning per call).
    os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')


def join(base: str, *parts: str) -> str:
  if not is_url(base):
    return os.path.join(base, *parts)
  return '/'.join([str(base).rstrip('/')] + [p.strip('/') for p in parts if p])


def dirname(path: str) -> str:
  if not is_url(path):
    return os.path.dirname(path)
  head, _, rest = str(path).partition('://')
  return f'{head}://' + (rest.rstrip('/').rsplit('/', 1)[0] if '/' in rest.rstrip('/') else rest)


def _fs(path: str):
  import fsspec
  s = scheme(path)
  if s not in SCHEMES:
    raise UserError(f'{path}: unsupported storage scheme {s}://: use a local path, gs://BUCKET/PATH or '
                    's3://BUCKET/PATH')
  kwargs = {}
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  if s == 'gs' and emulator:  # Explicit, so fsspec's instance cache keys on it (gcsfs reads it only once).
    kwargs['endpoint_url'] = emulator if '://' in emulator else f'http://{emulator}'
  if s == 's3' and os.environ.get('AWS_ENDPOINT_URL'):
    kwargs['endpoint_url'] = os.environ['AWS_ENDPOINT_URL']  # Older s3fs versions ignore the variable.
  return fsspec.filesystem(s, **kwargs)


def _key(path: str) -> str:
  return str(path).split('://', 1)[1].rstrip('/')


def bucket(path: str) -> str:
  return _key(path).split('/', 1)[0]


def advice(path: str, e: BaseException) -> str:
  """What to do about a failed storage request on `path`, from the error's kind (for one-line errors)."""
  low = f'{e.__class__.__name__}: {e}'.lower()
  where = f'{scheme(path)}://{bucket(path)}' if is_url(path) else path
  if isinstance(e, PermissionError) or re.search(r'\b40[13]\b', low) or 'forbidden' in low or 'access denied' in low:
    # Whole numbers: a port such as 127.0.0.1:40109 is no status.
    return 'give the credentials access to it, or choose another path'
  if 'nosuchbucket' in low or 'bucket' in low and ('not found' in low or 'not exist' in low):
    return f'create the bucket {where} first, or fix the name'
  if any(w in low for w in ('connect', 'timeout', 'timed out', 'unreachable', 'name or service', 'refused')):
    return (f'the storage endpoint {endpoint(path)} does not answer: check the network, STORAGE_EMULATOR_HOST / '
            'AWS_ENDPOINT_URL, then rerun')
  return 'check the path, the bucket and the credentials, then rerun'


def storage_error(path: str, e: BaseException, doing: str, limit: int = 200) -> UserError:
  """One line for a failed storage request on `path` (`doing`: 'read', 'write', ...)."""
  text = f'{e.__class__.__name__}: {e}'.splitlines()[0][:limit]
  return UserError(f'cannot {doing} {path} ({text}): {advice(path, e)}')


def _call(path: str, doing: str, fn, *args, **kwargs):
  """Runs one fsspec call, with any failure as one `UserError` (missing files stay FileNotFoundError)."""
  try:
    return fn(*args, **kwargs)
  except FileNotFoundError as e:
    if doing in ('write', 'copy'):  # A write finds no parent to miss but the bucket.
      raise UserError(f'cannot {doing} {path} (the bucket does not exist: {str(e)[:120]}): create the bucket '
                      f'{scheme(path)}://{bucket(path)} first, or fix the name') from None
    raise
  except UserError:
    raise
  except Exception as e:  # gcsfs/s3fs/aiohttp/botocore each have their own types: all become one line.
    for hook in FAILURE_HOOKS:  # storage/health.py's watchdog: stops the run if the endpoint stopped answering.
      hook(e)
    raise storage_error(path, e, doing) from None


FAILURE_HOOKS: list = []  # Called with the error of each failed storage call (`health.watch` adds its own).


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  fs = _fs(path)
  return bool(_call(path, 'read', fs.exists, _key(path)))


def isdir(path: str) -> bool:
  """A directory (local) or a prefix with objects under it (URL)."""
  if not is_url(path):
    return os.path.isdir(path)
  fs = _fs(path)
  return bool(_call(path, 'read', fs.isdir, _key(path)))


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  fs = _fs(path)
  return bool(_call(path, 'read', fs.isfile, _key(path)))


def read_bytes(path: str, end: int | None = None) -> bytes:
  """The file's bytes (its first `end` bytes when given: one ranged read); FileNotFoundError when there is none."""
  if not is_url(path):
    with open(path, 'rb') as f:
      return f.read() if end is None else f.read(end)
  fs = _fs(path)
  return _call(path, 'read', fs.cat_file, _key(path), start=0 if end is not None else None, end=end)


def read_range(path: str, start: int, length: int) -> bytes:
  """`length` bytes from byte `start`: a local `pread`, one ranged GET in a bucket."""
  if not is_url(path):
    fd = os.open(path, os.O_RDONLY)
    try:
      return os.pread(fd, length, start)
    finally:
      os.close(fd)
  fs = _fs(path)
  return _call(path, 'read', fs.cat_file, _key(path), start=start, end=start + length)


def read_many(parts: list[tuple[str, int | None, int | None]]) -> list[bytes]:
  """The bytes of each (path, start, length) of `parts` (start and length None: the whole file), in order. In a
  bucket, one request each, all in flight at once: a batch costs one round trip, not one per part. `gs://` reads
  take tensorstore (C++ requests, no Python per request: gcsfs' event loop holds the GIL for ~1 ms a request,
  which capped a bucket image folder at ~650 images/s); `s3://` takes s3fs' `cat_ranges`. The first failure
  raises as `read_range` would (missing: FileNotFoundError)."""
  if not parts:
    return []
  if not is_url(parts[0][0]):
    return [read_bytes(p) if start is None else read_range(p, start, length) for p, start, length in parts]
  if scheme(parts[0][0]) == 'gs':
    return _read_many_gs(parts)
  fs = _fs(parts[0][0])
  keys = [_key(p) for p, _, _ in parts]
  starts = [start for _, start, _ in parts]
  ends = [None if start is None else start + length for _, start, length in parts]
  out = _call(parts[0][0], 'read', fs.cat_ranges, keys, starts, ends, on_error='return')
  for (path, _, _), value in zip(parts, out, strict=True):
    if isinstance(value, BaseException):
      _call(path, 'read', _reraise, value)
  return out


def _reraise(e: BaseException):
  raise e


# tensorstore's own retries of a failed Cloud Storage request, for checkpoints (trainer/checkpoints.py) and data
# reads (its default: 32, up to 32 s apart, ~15 min for a server that is gone): 6 tries, 1 s to 8 s apart
# (~30 s), still enough for transient 429/503 errors.
GCS_REQUEST_RETRIES = {'max_retries': 6, 'initial_delay': '1s', 'max_delay': '8s'}
READ_CONCURRENCY = 128  # Requests in flight per bucket (tensorstore's default, 32, capped reads at ~1100/s at 20 ms).
_KVSTORES: dict = {}
_KVSTORES_LOCK = threading.Lock()


def _gcs_endpoint() -> str:
  """What tensorstore should reach: the emulator of STORAGE_EMULATOR_HOST (as gcsfs), else its own setting."""
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  if emulator:
    return emulator if '://' in emulator else f'http://{emulator}'
  return os.environ.get('TENSORSTORE_GCS_HTTP_URL', '')


def _kvstore(bucket_name: str):
  """A tensorstore KvStore of the bucket, one per (bucket, endpoint): tensorstore reads its endpoint from
  TENSORSTORE_GCS_HTTP_URL when a store opens, so it is set to ours for the open."""
  url = _gcs_endpoint()
  with _KVSTORES_LOCK:
    if (bucket_name, url) not in _KVSTORES:
      import tensorstore as ts
      saved = os.environ.get('TENSORSTORE_GCS_HTTP_URL')
      if url:
        os.environ['TENSORSTORE_GCS_HTTP_URL'] = url
      try:
        context = ts.Context({'gcs_request_retries': GCS_REQUEST_RETRIES,
                              'gcs_request_concurrency': {'limit': READ_CONCURRENCY}})
        _KVSTORES[bucket_name, url] = ts.KvStore.open({'driver': 'gcs', 'bucket': bucket_name},
                                                      context=context).result()
      except ValueError as e:  # An invalid bucket name.
        raise storage_error(f'gs://{bucket_name}', e, 'read') from None
      finally:
        if saved is None:
          os.environ.pop('TENSORSTORE_GCS_HTTP_URL', None)
        else:
          os.environ['TENSORSTORE_GCS_HTTP_URL'] = saved
    return _KVSTORES[bucket_name, url]


def _read_many_gs(parts) -> list[bytes]:
  futures = []
  for path, start, length in parts:
    key = _key(path).split('/', 1)[1] if '/' in _key(path) else ''
    byte_range = None if start is None else slice(start, start + length)
    futures.append(_kvstore(bucket(path)).read(key, byte_range=byte_range))
  out = []
  for (path, _, _), future in zip(parts, futures, strict=True):
    try:
      result = future.result()
    except Exception as e:  # Tensorstore's status errors (ValueError and others): one line.
      raise storage_error(path, e, 'read') from None
    if result.state != 'value':
      raise FileNotFoundError(path)
    out.append(result.value)
  return out


def download(url: str, local: str) -> None:
  """Copies the object at `url` to the local file `local`, streamed (never whole in memory), atomically: a
  reader of `local` sees nothing or the whole object."""
  fs = _fs(url)
  tmp = f'{local}.tmp{os.getpid()}'
  try:
    _call(url, 'read', fs.get_file, _key(url), tmp)
    os.replace(tmp, local)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def stat(path: str) -> tuple[int, str]:
  """(size in bytes, version): the version changes whenever the file is rewritten (a bucket's generation or
  ETag; a local file's mtime), so a cache of something derived from the file knows when it is stale."""
  if not is_url(path):
    st = os.stat(path)
    return st.st_size, str(st.st_mtime_ns)
  fs = _fs(path)
  info = _call(path, 'read', fs.info, _key(path))
  version = next((str(info[k]) for k in ('generation', 'ETag', 'etag', 'md5Hash', 'mtime') if info.get(k)), '')
  return int(info['size']), version


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def write_bytes(path: str, data: bytes) -> None:
  """Replaces `path` atomically: a reader sees the old bytes or the new ones. Local: a temporary file in the
  same directory, renamed over the target. URL: one object write."""
  if not is_url(path):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
    return
  fs = _fs(path)
  _call(path, 'write', fs.pipe_file, _key(path), data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def append_text(path: str, text: str) -> None:
  """Appends `text`. Local: an append. URL: the whole object rewritten (one object, never half of one)."""
  if not is_url(path):
    with open(path, 'a') as f:
      f.write(text)
    return
  try:
    old = read_bytes(path)
  except FileNotFoundError:
    old = b''
  write_bytes(path, old + text.encode('utf-8'))


def listdir(path: str) -> list[str]:
  """Names directly under `path` (files and directories), sorted; [] when there is nothing."""
  if not is_url(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs = _fs(path)
  try:
    entries = _call(path, 'list', fs.ls, _key(path), detail=False, refresh=True)
  except FileNotFoundError:
    return []
  prefix = _key(path) + '/'
  return sorted({e.rstrip('/')[len(prefix):].split('/', 1)[0] for e in entries if e.startswith(prefix)} - {''})


def walk_files(path: str) -> dict[str, int]:
  """{path relative to `path` ('/'-separated): size in bytes} of every file under `path`, at any depth; {} when
  there is none. A URL is one recursive listing (a request per 1000 objects, not one per folder or file), and a
  bucket that does not exist is a `UserError`; a local path walks with `os`, following linked folders."""
  if not is_url(path):
    out = {}
    for root, _, names in os.walk(path, followlinks=True):
      for name in names:
        full = os.path.join(root, name)
        if os.path.isfile(full):
          out[os.path.relpath(full, path).replace(os.sep, '/')] = os.path.getsize(full)
    return out
  fs = _fs(path)
  try:
    found = _call(path, 'list', fs.find, _key(path), detail=True)
  except FileNotFoundError as e:  # A missing prefix lists nothing; only a missing bucket raises.
    raise UserError(f'cannot list {path} (the bucket does not exist: {str(e)[:120]}): fix the bucket name '
                    f'{scheme(path)}://{bucket(path)}') from None
  prefix = _key(path) + '/'
  return {k[len(prefix):]: int(v.get('size') or 0) for k, v in found.items()
          if k.startswith(prefix) and v.get('type', 'file') == 'file' and not k.endswith('/')}


def makedirs(path: str) -> None:
  """Local: `os.makedirs`. URL: nothing (an object store creates prefixes with their first object)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  if not is_url(path):
    os.remove(path)
    return
  fs = _fs(path)
  _call(path, 'delete', fs.rm_file, _key(path))


def rmtree(path: str) -> None:
  if not is_url(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs = _fs(path)
  try:
    _call(path, 'delete', fs.rm, _key(path), recursive=True)
  except FileNotFoundError:
    pass


def move(src: str, dst: str) -> None:
  """Moves a file or directory. Local: a rename. URL: copy, then delete (object stores have no rename)."""
  if not is_url(src):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
    return
  fs = _fs(src)
  if _call(src, 'read', fs.isdir, _key(src)):
    _call(src, 'copy', fs.copy, _key(src) + '/', _key(dst) + '/', recursive=True)
  else:
    _call(src, 'copy', fs.copy, _key(src), _key(dst))
  rmtree(src)


def upload(local: str, url: str) -> None:
  """Copies local file `local` to `url` (one object write)."""
  with open(local, 'rb') as f:
    write_bytes(url, f.read())


CONNECT_TIMEOUT_S = 10  # For the start's reachability check: the clients' own retries take ~35 s (gcsfs: 6 tries).


def endpoint(path: str) -> str:
  """The URL requests for `path` go to: the variable users set, or the store's public endpoint."""
  if scheme(path) == 'gs':
    url = os.environ.get('STORAGE_EMULATOR_HOST') or 'https://storage.googleapis.com'
  else:
    url = os.environ.get('AWS_ENDPOINT_URL') or 'https://s3.amazonaws.com'
  return url if '://' in url else f'http://{url}'


def check_reachable(path: str) -> None:
  """One TCP connection to `path`'s endpoint within `CONNECT_TIMEOUT_S`: an endpoint that does not answer
  stops the start in seconds, not after the clients' retries. Behind an HTTPS proxy the clients' own route
  is the only test."""
  if os.environ.get('HTTPS_PROXY') or os.environ.get('https_proxy'):
    return
  import socket
  import urllib.parse
  u = urllib.parse.urlsplit(endpoint(path))
  port = u.port or (443 if u.scheme == 'https' else 80)
  try:
    socket.create_connection((u.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
  except OSError as e:
    raise storage_error(path, ConnectionError(f'cannot connect to {u.hostname}:{port}: {e}'), 'reach') from None


def probe_writable(path: str) -> None:
  """Writes and deletes one small object under `path`: proves the endpoint answers, the bucket exists and the
  credentials may write, before any work starts."""
  if is_url(path):
    check_reachable(path)
  name = join(path, f'.write_test_{os.getpid()}')
  write_bytes(name, b'ok')
  remove(name)


def cache_dir(url: str, *parts: str) -> str:
  """A local directory for files that libraries can only write locally (TensorBoard events, profile traces),
  uploaded to `url` from there: `$DPTRAIN_CACHE_DIR` (default `~/.cache/dptrain`)/<scheme>/<bucket>/<path>-
  <hash>. Never derived from the URL as a relative path (no `./gs:` folder), and never the only copy."""
  root = os.environ.get('DPTRAIN_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'dptrain')
  digest = hashlib.sha256(str(url).encode()).hexdigest()[:10]
  name = _key(url).replace('/', '_')[:80] + '-' + digest
  path = os.path.join(root, scheme(url), name, *parts)
  os.makedirs(path, exist_ok=True)
  return path


def upload_tree(local_dir: str, url: str) -> None:
  """Uploads every file under `local_dir` whose size or mtime changed since the last call (to `url/...`)."""
  seen = _uploaded.setdefault((local_dir, url), {})
  for root, _, names in os.walk(local_dir):
    for name in names:
      path = os.path.join(root, name)
      st = os.stat(path)
      if seen.get(path) != (st.st_size, st.st_mtime_ns):
        upload(path, join(url, *os.path.relpath(path, local_dir).split(os.sep)))
        seen[path] = (st.st_size, st.st_mtime_ns)


_uploaded: dict = {}

"""Conditional object writes: the primitives of a lock on a bucket, which has no flock.

Every write names the version it expects, and the store refuses it (HTTP 412) when the object is not at that
version, so of two writers racing for the same object exactly one wins:
  - `create`: only if no object exists (Cloud Storage `ifGenerationMatch=0`, S3 `If-None-Match: *`);
  - `replace` / `delete`: only if the object is still the version `tag` names (its generation on Cloud
    Storage, its ETag on S3: `ifGenerationMatch=N`, `If-Match`).
Cloud Storage uploads go as one multipart request: fake-gcs-server enforces `ifGenerationMatch` there but not
on `uploadType=media` uploads (real Cloud Storage enforces both). A lost conditional write raises `Conflict`;
any other failure is one `UserError` line (`storage.storage_error`).
"""

import json

import storage


class Conflict(Exception):
  """The object exists (`create`) or is no longer at the expected version (`replace`, `delete`)."""


def _gcs(url: str):
  fs = storage._fs(url)
  return fs, storage.bucket(url), storage._key(url).split('/', 1)[1]


def _gcs_upload(url: str, data: bytes, generation: str) -> str:
  fs, bucket, key = _gcs(url)
  meta = json.dumps({'name': key})
  body = (f'--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n'
          'Content-Type: application/octet-stream\n\n').encode() + data + b'\n--==0==--'
  out = fs.call('POST', f'{fs._location}/upload/storage/v1/b/{bucket}/o', uploadType='multipart', json_out=True,
                headers={'Content-Type': 'multipart/related; boundary="==0=="'}, data=body,
                ifGenerationMatch=generation)
  return str(out['generation'])


def _s3(url: str):
  fs = storage._fs(url)
  return fs, storage.bucket(url), storage._key(url).split('/', 1)[1]


def _precondition_failed(e: BaseException) -> bool:
  """gcsfs turns 412 into FileExistsError; botocore/s3fs name it PreconditionFailed (or 412)."""
  text = f'{e.__class__.__name__} {e}'
  return isinstance(e, FileExistsError) or 'PreconditionFailed' in text or '412' in text \
      or 'pre-conditions' in text


def _run(url: str, doing: str, fn):
  try:
    return fn()
  except Conflict:
    raise
  except Exception as e:
    if _precondition_failed(e):
      raise Conflict(url) from None
    if isinstance(e, FileNotFoundError) or 'NoSuchKey' in str(e):
      if doing == 'read':
        raise FileNotFoundError(url) from None
      raise Conflict(url) from None  # Gone: not the version the caller holds either.
    raise storage.storage_error(url, e, 'write' if doing != 'read' else 'read') from None


def create(url: str, data: bytes) -> str:
  """Writes `url` only if no object is there; returns its version tag. Raises `Conflict` if one is."""
  if storage.scheme(url) == 'gs':
    return _run(url, 'create', lambda: _gcs_upload(url, data, '0'))
  fs, bucket, key = _s3(url)
  return _run(url, 'create', lambda: fs.call_s3('put_object', Bucket=bucket, Key=key, Body=data,
                                                 IfNoneMatch='*')['ETag'])


def replace(url: str, data: bytes, tag: str) -> str:
  """Overwrites `url` only if it is still at version `tag`; returns the new tag. Raises `Conflict` if not."""
  if storage.scheme(url) == 'gs':
    return _run(url, 'replace', lambda: _gcs_upload(url, data, tag))
  fs, bucket, key = _s3(url)
  return _run(url, 'replace', lambda: fs.call_s3('put_object', Bucket=bucket, Key=key, Body=data,
                                                  IfMatch=tag)['ETag'])


def read(url: str) -> tuple[bytes, str] | None:
  """(bytes, version tag) of `url` in one request (the two belong together), or None when there is none."""
  def get():
    if storage.scheme(url) == 'gs':
      fs, bucket, key = _gcs(url)
      headers, body = fs.call('GET', 'b/{}/o/{}', bucket, key, alt='media')
      return bytes(body), str(headers['X-Goog-Generation'])
    from fsspec.asyn import sync
    fs, bucket, key = _s3(url)

    async def get_s3():
      out = await fs._call_s3('get_object', Bucket=bucket, Key=key)
      async with out['Body'] as body:
        return await body.read(), out['ETag']
    return sync(fs.loop, get_s3)
  try:
    return _run(url, 'read', get)
  except FileNotFoundError:
    return None


def delete(url: str, tag: str) -> None:
  """Deletes `url` only if it is still at version `tag`. Raises `Conflict` if not. (fake-gcs-server ignores
  `ifGenerationMatch` on deletes; real Cloud Storage and S3 honour it.)"""
  if storage.scheme(url) == 'gs':
    fs, bucket, key = _gcs(url)
    return _run(url, 'delete', lambda: fs.call('DELETE', 'b/{}/o/{}', bucket, key, ifGenerationMatch=tag)) and None
  fs, bucket, key = _s3(url)
  _run(url, 'delete', lambda: fs.call_s3('delete_object', Bucket=bucket, Key=key, IfMatch=tag))

"""Orbax's checkpoints on the trainer's storage route: bounded retries, and `s3://` directories.

Orbax 0.12.8 offers no option for either, so this adapts its tensorstore layer in place (`install()`, once,
before the first checkpoint; versions are pinned in setup.cfg):
- every tensorstore context Orbax builds comes from two module dicts, which get the bounded Cloud Storage and
  S3 retries of `storage.GCS_REQUEST_RETRIES` (tensorstore's default would retry a server that is gone for
  about 15 minutes);
- Orbax maps only `gs://` and local paths to tensorstore key-value stores (`build_kvstore_tspec`; S3 is the
  open google/orbax#2739), while tensorstore has an `s3` driver. An `s3://B/P` directory is built as Orbax
  builds `gs://B/P` (OCDBT, per-process databases, read coalescing: all Orbax's own), and each `gcs` store
  in that spec becomes an `s3` store of the same bucket and path, at `AWS_ENDPOINT_URL` and `AWS_REGION`
  when they are set (tensorstore reads the credentials from the usual AWS variables and files).
Everything else Orbax does to a directory (listing, metadata files, deleting old steps) goes through
`etils.epath`, which `storage.configure()` points at fsspec (s3fs).

An S3 directory cannot be renamed atomically, so an S3 step is committed as on Cloud Storage: written in
place, `commit_success.txt` last (`temporary_path_class`); a step without it is ignored, never restored.
"""

import os

import storage

_installed = False


def install() -> None:
  """Idempotent; imports Orbax."""
  global _installed
  if _installed:
    return
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  for name in ('_BASE_TS_CONTEXT', '_DEFAULT_OCDBT_TS_CONTEXT'):
    context = getattr(ts_utils, name, None)
    if isinstance(context, dict):
      context.setdefault('gcs_request_retries', dict(storage.GCS_REQUEST_RETRIES))
      context.setdefault('s3_request_retries', dict(storage.GCS_REQUEST_RETRIES))
      if os.environ.get('AWS_ACCESS_KEY_ID'):  # Keys in the environment: the profile files go unread (and
        context.setdefault('aws_credentials', {'type': 'environment'})  # unlogged: 5 lines per store).
  build = ts_utils.build_kvstore_tspec

  def build_kvstore_tspec(directory, *args, **kwargs):
    directory = str(directory)
    if not directory.startswith('s3://'):
      return build(directory, *args, **kwargs)
    return s3_spec(build('gs://' + directory[len('s3://'):], *args, **kwargs))

  ts_utils.build_kvstore_tspec = build_kvstore_tspec
  _installed = True


def s3_spec(spec):
  """`spec` (a tensorstore JSON spec) with each `gcs` key-value store made an `s3` one."""
  if isinstance(spec, list):
    return [s3_spec(v) for v in spec]
  if not isinstance(spec, dict):
    return spec
  if spec.get('driver') != 'gcs':
    return {k: s3_spec(v) for k, v in spec.items()}
  out = {k: v for k, v in spec.items() if k not in ('driver', 'user_project')}
  out['driver'] = 's3'
  if os.environ.get('AWS_ENDPOINT_URL'):
    out['endpoint'] = os.environ['AWS_ENDPOINT_URL']
  region = os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION')
  if region:
    out['aws_region'] = region
  return out


def temporary_path_class(directory: str):
  """The Orbax commit protocol for `directory`: Cloud Storage's (commit file) on S3, else Orbax's default."""
  if storage.scheme(directory) != 's3':
    return None
  from orbax.checkpoint._src.path import atomicity
  return atomicity.CommitFileTemporaryPath

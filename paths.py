"""What a path the user typed means: `resolve_path` (a light module: train.py, the trainer and the input
pipeline all import it, and it imports nothing of theirs).
"""

import os


def is_url(path: str) -> bool:
  """gs://, s3://, hdfs://...: a remote path, which the filesystem helpers must never rewrite."""
  return '://' in path


def resolve_path(path: str) -> str:
  """A local path as the shell would have read it, made absolute: a leading `~` (which a quoted
  `--workdir='~/runs/x'` keeps) expands to the home directory instead of a literal `./~` folder. URLs and
  '' (the field's "default location") come back unchanged."""
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))

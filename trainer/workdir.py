"""The workdir: checked before anything starts, created only once the job is known to be runnable."""

import os

import jax

from errors import UserError


def check(workdir: str) -> None:
  """Fails early (creating nothing) when `workdir` cannot become a writable directory."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise UserError(f'--workdir={workdir} is not usable: {path} is a file, not a directory: choose another --workdir')
  if not os.access(path, os.W_OK | os.X_OK):
    raise UserError(f'--workdir={workdir} is not writable ({path} denies write access): choose a directory you '
                    'can write to')


def prepare(workdir: str) -> None:
  """Creates `workdir` and proves it writable by this process (a probe file, removed again)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'--workdir={workdir} is not writable ({e.strerror}): choose a directory you can write to') \
        from None

"""`--config.profile_steps=N`: a trace of N train steps in WORKDIR/profile, for TensorBoard's profile tab / XProf.

The trace starts after the first step of the run (compilation is over, so the trace shows steady-state
steps) and stops once the N steps have finished on the devices. Every process traces its own host. N beyond
the end of the run is clamped to the steps there are (and the log says so).
"""

import os

import jax
from absl import logging

import storage


class Profiler:

  def __init__(self, workdir: str, num_steps: int, start_step: int, total_steps: int):
    self.directory = storage.join(workdir if storage.is_url(workdir) else os.path.abspath(workdir), 'profile')
    # The profiler writes local files only: a bucket workdir's trace goes to the cache, uploaded at the end.
    self._local = storage.cache_dir(workdir, 'profile') if storage.is_url(workdir) else self.directory
    self.first, self.last = start_step + 1, min(start_step + 1 + num_steps, total_steps)
    self.active = False
    self._seen = self.first
    if num_steps > 0 and self.last <= self.first:
      logging.warning('profile_steps=%d: the run has no steps left to trace after step %d (of %d): no profile',
                      num_steps, self.first, total_steps)
    elif num_steps > self.last - self.first:
      logging.info('profile_steps=%d runs past the end of the run (step %d): tracing the %d steps %d..%d instead',
                   num_steps, total_steps, self.last - self.first, self.first + 1, self.last)

  def step(self, step: int, state) -> None:
    """Called after step `step` was dispatched, with the state it produced."""
    if step == self.first and not self.active and self.last > self.first:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self._local)
      self.active = True
    elif self.active:
      self._seen = step
      if step >= self.last:
        self.close(state)

  def close(self, state=None) -> None:
    """Stops the trace (after `state` is computed), if one is running: at the end, or when the run stops early."""
    if not self.active:
      return
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    if self._local != self.directory:
      storage.upload_tree(self._local, self.directory)
    logging.info('Profile of steps %d..%d written to %s (view: tensorboard --logdir %s, Profile tab)',
                 self.first + 1, min(self._seen, self.last), self.directory, self.directory)

"""`--config.profile_steps=N`: a trace of N train steps in WORKDIR/profile, for TensorBoard's profile tab / XProf.

The trace starts after the first step of the run (compilation is over, so the trace shows steady-state
steps) and stops once the N steps have finished on the devices. Every process traces its own host.
"""

import os

import jax
from absl import logging


class Profiler:

  def __init__(self, workdir: str, num_steps: int, start_step: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'profile')
    self.first, self.last = start_step + 1, start_step + 1 + num_steps
    self.active = False

  def step(self, step: int, state) -> None:
    """Called after step `step` was dispatched, with the state it produced."""
    if step == self.first and not self.active:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.directory)
      self.active = True
    elif self.active and step >= self.last:
      self.close(state)

  def close(self, state=None) -> None:
    """Stops the trace (after `state` is computed), if one is running: at the end, or when the run stops early."""
    if not self.active:
      return
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    logging.info('Profile of steps %d..%d written to %s (view: tensorboard --logdir %s, Profile tab)',
                 self.first + 1, self.last, self.directory, self.directory)

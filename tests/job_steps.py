"""A few train steps of the trainer's own job, in process, on fixed 16x16 batches: for tests that compare two
implementations of the same math (`cpu_kernels`, `parallel_backend`) step by step."""

import jax
import numpy as np

from benchmarks import kit
from parallel import mesh as mesh_lib
from trainer import job as job_lib


def run_steps(overrides: dict, steps: int = 3, devices: int = 2):
  """(per-step loss sums, the canonical state after `steps` steps, the eval loss sum of the first batch)."""
  rng = np.random.default_rng(2)
  pixels = rng.integers(0, 256, (steps, 16, 16, 16, 1)).astype(np.uint8)
  images = pixels.astype(np.float32) / 255
  labels = rng.integers(0, 10, (steps, 16)).astype(np.int32)
  data = kit.dataset(images=pixels.reshape(-1, 16, 16, 1), labels=labels.reshape(-1), test=(pixels[0], labels[0]))
  c = kit.config(small=True, **{'batch_size': 16, **overrides})
  job = job_lib.build(c, mesh=mesh_lib.make_mesh(devices), data=data)
  state = job.stepper.to_device(job.initial_state())
  losses = []
  for i in range(steps):
    state, m = job.stepper.train_step(state, job.stepper.place({'image': images[i], 'label': labels[i]}))
    losses.append(float(job.stepper.metrics(m)['loss_sum']))
  canonical = jax.device_get(job.stepper.to_canonical(job.stepper.sync_batch_stats(state)))  # bn_mode=local too
  evals = job.stepper.eval_step(job.stepper.eval_state(job.stepper.to_device(canonical)), job.stepper.place(
      {'image': images[0], 'label': labels[0], 'mask': np.ones(16, np.float32)}))
  return losses, canonical, float(evals['loss_sum'])

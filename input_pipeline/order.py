"""Which examples form each global batch: a pure function of (seed, epoch, dataset size, global batch).

Keeping the order independent of device and process counts is what lets 8 devices, or 2 processes x 4
devices, reproduce a 1-device run exactly. Resuming at step k needs nothing but k.
"""

import numpy as np


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full global batches per epoch (the incomplete last batch of an epoch is dropped)."""
  return num_examples // global_batch


def epoch_batches(seed: int, epoch: int, num_examples: int, global_batch: int) -> np.ndarray:
  """Example indices of every global batch of `epoch`: int32 [steps_per_epoch, global_batch].

  A fresh permutation per epoch, seeded by (seed, epoch), so any epoch is computed without the others.
  """
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  n = steps_per_epoch(num_examples, global_batch)
  return perm[:n * global_batch].reshape(n, global_batch).astype(np.int32)


def eval_batches(num_examples: int, eval_batch: int):
  """Indices and mask of every eval batch; the last one is padded (mask 0) so every example counts once."""
  num_batches = -(-num_examples // eval_batch)
  flat = np.arange(num_batches * eval_batch)
  mask = flat < num_examples
  return np.where(mask, flat, 0).reshape(num_batches, eval_batch).astype(np.int32), mask.reshape(
      num_batches, eval_batch)

"""Where each train-state array lives under the `jit` backend: replicated, or FSDP-sharded over `data`.

`shard_params=fsdp` (big_vision's `fsdp` rule, MaxText's `ici_fsdp_parallelism`, Levanter's `fsdp_axis`):
every array of the state (params, EMA params, optimizer state, BatchNorm statistics) is split over the
`data` axis along its largest dimension that the device count divides; arrays under `fsdp_min_bytes`, and
those with no such dimension, stay replicated. The partitioner then all-gathers a layer's params where
they are used and reduce-scatters their gradients, so each device keeps about 1/N of the state.

The floor: big_vision's 4 MiB would leave every array of ViT-S (the largest, an MLP kernel, is 2.25 MiB)
replicated. 64 KiB shards every kernel of ViT-Ti/S/B/L and of the ResNets but the smallest 1x1 convs,
while biases, LayerNorm/BatchNorm vectors and scalars (a few KiB each; splitting them buys nothing and
costs a collective each) stay whole.
"""


import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel.mesh import AXIS

FSDP_MIN_BYTES = 64 * 1024  # Default of config.fsdp_min_bytes.


def replicated_spec(shape, num_devices: int, min_bytes: int) -> P:
  del shape, num_devices, min_bytes
  return P()


def fsdp_spec(shape, num_devices: int, min_bytes: int, itemsize: int = 4) -> P:
  """P with AXIS on the largest dimension of `shape` that `num_devices` divides (the first such on ties);
  P() for arrays under `min_bytes` or without a divisible dimension."""
  if num_devices <= 1 or int(np.prod(shape, dtype=np.int64)) * itemsize < min_bytes:
    return P()
  dims = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
  for i in dims:
    if shape[i] % num_devices == 0:
      return P(*([None] * i + [AXIS]))
  return P()


# config.shard_params -> the rule (shape, devices, min_bytes[, itemsize]) -> PartitionSpec.
SHARD_PARAMS: dict[str, object] = {'none': replicated_spec, 'fsdp': fsdp_spec}


def state_shardings(tree, mesh, mode: str = 'none', min_bytes: int = FSDP_MIN_BYTES):
  """An abstract (or concrete) state tree -> a tree of NamedShardings of the same structure."""
  n = mesh.devices.size

  def one(x):
    if mode == 'fsdp':
      return NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, min_bytes, np.dtype(x.dtype).itemsize))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, tree)


def bytes_per_device(tree, shardings=None) -> int:
  """Sum over leaves of the bytes of one device's shard (the first device's: the rule splits evenly).

  `tree` holds arrays or `jax.ShapeDtypeStruct`s; their own `.sharding` is used unless `shardings` is given.
  """
  leaves = jax.tree.leaves(tree)
  given = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)) if shardings else None
  total = 0
  for i, x in enumerate(leaves):
    sharding = given[i] if given else getattr(x, 'sharding', None)
    shape = tuple(x.shape)
    if sharding is not None:
      shape = sharding.shard_shape(shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total

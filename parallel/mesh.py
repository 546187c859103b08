"""One mesh with a `data` axis over every device of every process, and the layouts that go with it."""


import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from errors import UserError, setting

AXIS = 'data'


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D `data` mesh over all devices of all processes (each process's devices contiguous).

  `num_devices` > 0 takes only the first that many (single-process runs: tests, benchmarks).
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if num_devices:
    if num_devices > len(devices):
      raise UserError(f'{num_devices} devices were requested but only {len(devices)} exist: ask for at most '
                      f'{len(devices)}, or simulate more with --num_cpu_devices')
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, num_devices: int, what: str = 'batch_size') -> None:
  """A global batch must split evenly over the devices; say which sizes would."""
  if global_batch <= 0:
    raise UserError(f'{setting(what)}={global_batch} must be positive')
  if global_batch % num_devices:
    lower = global_batch // num_devices * num_devices
    near = [s for s in (lower, lower + num_devices) if s > 0]
    raise UserError(f'{setting(what)}={global_batch} does not split over {num_devices} devices: use a multiple '
                    f'of {num_devices}, e.g. {" or ".join(map(str, near))}')


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """Rows [lo, hi) of every global batch that this process's devices hold."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  starts = sorted((s[0].start or 0, s[0].stop if s[0].stop is not None else global_batch)
                  for s in index_map.values())
  lo, hi = starts[0][0], starts[-1][1]
  if hi - lo != sum(b - a for a, b in starts):
    raise RuntimeError(f'process {jax.process_index()} holds non-contiguous batch rows {starts}')
  return lo, hi


def to_global(mesh: Mesh, local_batch, batch_axis: int = 0):
  """This process's rows -> one global jax.Array per leaf, sharded over `data` (shard_map layout) on
  `batch_axis` (1 for k steps stacked on a leading axis).

  Every process holds the same number of devices, so the global batch is the local one times
  (devices / local devices).
  """
  spec = P(*([None] * batch_axis + [AXIS]))
  sharding = NamedSharding(mesh, spec)
  scale = mesh.devices.size // sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def global_shape(x):
    shape = list(x.shape)
    shape[batch_axis] *= scale
    return tuple(shape)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x, global_shape(x)), local_batch)

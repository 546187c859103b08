"""Model-FLOPs utilisation: XLA's FLOP count of the compiled train step over the device's peak rate.

The peak comes from `PEAK_FLOPS` (dense matmul rates per JAX device, from the vendors' data sheets) or, on
a CPU, from a float32 matmul measured on the mesh's devices at once (simulated CPU devices share the
cores, so each device's peak is its share of the measured total).
"""

import functools
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel import mesh as mesh_lib, sharding

# device_kind prefix -> {dtype: dense FLOP/s of one JAX device}. TPU v2/v3 devices are cores (half a chip);
# v4 and later are chips. GPU float32 is the TF32 tensor-core rate (XLA's default matmul precision on Ampere
# and newer); TPU float32 matmuls run as bf16 passes at default precision, so both columns match.
PEAK_FLOPS = {
    'TPU v2': {'bfloat16': 22.5e12, 'float32': 22.5e12},
    'TPU v3': {'bfloat16': 61.5e12, 'float32': 61.5e12},
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12},
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12},
    'TPU v5e': {'bfloat16': 197e12, 'float32': 197e12},
    'TPU v5p': {'bfloat16': 459e12, 'float32': 459e12},
    'TPU v5': {'bfloat16': 459e12, 'float32': 459e12},
    'TPU v6 lite': {'bfloat16': 918e12, 'float32': 918e12},
    'TPU v6e': {'bfloat16': 918e12, 'float32': 918e12},
    'NVIDIA H100': {'bfloat16': 989e12, 'float32': 494.5e12},
    'NVIDIA H200': {'bfloat16': 989e12, 'float32': 494.5e12},
    'NVIDIA B200': {'bfloat16': 2250e12, 'float32': 1125e12},
    'NVIDIA A100': {'bfloat16': 312e12, 'float32': 156e12},
    'NVIDIA L4': {'bfloat16': 121e12, 'float32': 60e12},
    'Tesla V100': {'bfloat16': 125e12, 'float32': 15.7e12},  # bfloat16 column: V100's float16 tensor cores.
}


def cost_flops(program) -> float:
  """Flops of one lowered (or compiled) program from XLA's cost analysis (a dict, or a list of dicts in some
  versions). A lowered program is counted before XLA's optimisations, without compiling it (CNN: within 1% of
  the compiled count).

  For an SPMD (shard_map/jit) or pmap executable this is one device's program: multiply by the devices.
  """
  cost = program.cost_analysis()
  if isinstance(cost, (list, tuple)):
    return float(sum(c.get('flops', 0.0) for c in cost if c))
  return float((cost or {}).get('flops', 0.0))


def table_peak(device_kind: str, dtype: str) -> float | None:
  """The table's peak for a device kind (longest matching prefix), or None for an unknown kind."""
  matches = [k for k in PEAK_FLOPS if device_kind.startswith(k)]
  return PEAK_FLOPS[max(matches, key=len)][dtype] if matches else None


@functools.cache
def measured_cpu_peak(num_devices: int, n: int = 1024, reps: int = 5) -> float:
  """Float32 matmul FLOP/s of one of `num_devices` CPU devices all multiplying at once (median of `reps`)."""
  mesh = mesh_lib.make_mesh(num_devices)
  spec = NamedSharding(mesh, P(mesh_lib.AXIS))
  a = jax.device_put(np.random.default_rng(0).standard_normal((num_devices * n, n), np.float32), spec)
  dot = jax.jit(jax.shard_map(lambda x: x @ x.T, mesh=mesh, in_specs=P(mesh_lib.AXIS), out_specs=P(mesh_lib.AXIS)))
  dot(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    dot(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * n ** 3 / float(np.median(times))


def device_peak(mesh, dtype: str) -> float | None:
  """Peak FLOP/s of one device of `mesh` in `dtype`: the table for TPUs/GPUs, measured on a CPU."""
  device = mesh.devices.flat[0]
  if device.platform == 'cpu':
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return measured_cpu_peak(local)
  return table_peak(device.device_kind, dtype)


def train_step_flops(job, state) -> float | None:
  """FLOPs of one device's train step: XLA's cost analysis of the same math with XLA's convolutions
  (`Job.flops_stepper`), lowered but not compiled, so it costs a trace, not a second compile. None where the
  backend offers no cost analysis."""
  lo, hi = mesh_lib.process_rows(job.mesh, job.config.batch_size)
  batch = job.stepper.place({'image': np.zeros((hi - lo,) + tuple(job.prep.output_shape), np.float32),
                             'label': np.zeros((hi - lo,), np.int32)})
  try:
    return cost_flops(job.flops_stepper().train_step.lower(state, batch)) or None
  except Exception:  # Some backends/versions have no cost analysis: report images/s only.
    return None


class Utilization:
  """Images/s per device and MFU for the train log, from the images/s of a log window."""

  def __init__(self, job):
    self.job = job
    self._flops = self._peak = None
    self._ready = False
    self._state_bytes_logged = False

  def window(self, images_per_sec: float, state) -> dict:
    n = self.job.mesh.devices.size
    if not self._ready:  # After the first step: the cost analysis traces the step again, but compiles nothing.
      self._ready = True
      self._flops = train_step_flops(self.job, state)
      self._peak = device_peak(self.job.mesh, self.job.config.dtype)
    out = {'images_per_sec_per_device': round(images_per_sec / n, 1)}
    if not self._state_bytes_logged:  # The first train event: what one device holds of the state.
      self._state_bytes_logged = True
      out['state_bytes_per_device'] = sharding.bytes_per_device(state)
    if self._flops and self._peak:
      steps_per_sec = images_per_sec / self.job.config.batch_size
      out['flops_per_step'] = self._flops * n
      # Significant digits, not decimals: a tiny net's MFU is ~1e-4 (4 decimals rounded it to 0).
      out['mfu'] = float(f'{self._flops * steps_per_sec / self._peak:.3g}')
    return out

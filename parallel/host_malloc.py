"""Keeps glibc from handing the step's buffers back to the kernel after every step.

Why: XLA's CPU runtime allocates and frees the step's temporaries (activations, gradients, im2col blocks) with
`malloc` on every step. glibc serves blocks above its dynamic mmap threshold with fresh `mmap`s and trims the
heap top above 128 KiB, so each step paid for zero-filled pages again: on the 2-core AMD EPYC VM, `perf` put
~20% of the ResNet step's samples in the kernel's page-fault path, and the CNN benchmark saw ~2-3 M minor
faults per run. Raising the thresholds (what `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` and
`MALLOC_TOP_PAD_` would do, but from inside the process) cut the faults by 30-80% and raised the default
CNN job from ~1,420-1,780 to ~1,880-2,010 img/s in the same session (benchmarks/throughput.py).
Cost: the process keeps up to its peak heap mapped instead of returning it between steps. `DPTRAIN_MALLOC=glibc`
in the environment leaves glibc's defaults (the throughput benchmark runs the seed's loop that way).
"""

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: larger blocks still get their own mmap.
_TRIM_THRESHOLD = 1 << 31
_TOP_PAD = 64 << 20


def keep_freed_memory() -> bool:
  """Applies the thresholds; False (nothing changed) where the C library is not glibc or DPTRAIN_MALLOC=glibc."""
  if os.environ.get('DPTRAIN_MALLOC', '') == 'glibc':
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD)))

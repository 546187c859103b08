"""Keeps glibc from handing the step's buffers back to the kernel after every step.

Why: XLA's CPU runtime allocates and frees the step's temporaries (activations, gradients, im2col blocks) with
`malloc` on every step. glibc serves blocks above its dynamic mmap threshold with fresh `mmap`s and trims the
heap top above 128 KiB, so each step paid for zero-filled pages again: on the 2-core AMD EPYC VM, `perf` put
~20% of the ResNet step's samples in the kernel's page-fault path, and the CNN benchmark saw ~2-3 M minor
faults per run. Raising the thresholds (what `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` and
`MALLOC_TOP_PAD_` would do, but from inside the process) cut the faults by 30-80% and raised the default
CNN job from ~1,420-1,780 to ~1,880-2,010 img/s in the same session (benchmarks/throughput.py).
Cost: the process keeps up to its peak heap mapped instead of returning it between steps.

Blocks above 32 MiB (glibc's ceiling for that threshold; the ResNet's step temporaries) still get a fresh
`mmap` per step. `restart_for(config)` backs those with transparent huge pages (`--config.huge_pages`): one
fault per 2 MiB instead of per 4 KiB. On the 2-core AMD EPYC VM the fashion_mnist_resnet step went from
~325-340 to ~385-410 img/s, while the default CNN, whose blocks stay under 32 MiB, lost ~3% (three pairs of
runs: 2018/1782/1921 off vs 1957/1743/1857 on). It is opt-in (`huge_pages='on'`; configs/fashion_mnist_resnet.py,
a CPU recipe, sets it): the restart re-executes the process, which nothing but a large-step CPU job gains from.

`DPTRAIN_MALLOC=glibc` in the environment turns both off and leaves glibc's defaults (the throughput benchmark
runs the seed's loop that way).
"""

import ctypes
import ctypes.util
import os
import platform
import sys

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


HUGE_PAGES = {'off': False, 'on': True}  # --config.huge_pages: opt-in, so no GPU or TPU job is re-executed.
_HUGETLB = 'glibc.malloc.hugetlb=1'
_RESTARTED = 'DPTRAIN_MALLOC_RESTARTED'  # Set in the restarted process, holding the original GLIBC_TUNABLES.
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


def huge_pages_wanted(config) -> bool:
  return HUGE_PAGES[config.huge_pages]


def restart_for(config) -> None:
  """`restart_with_huge_pages` where `config` wants huge pages. Call it before the backend starts, the workdir
  is locked or a file is written: the restarted process redoes everything up to here."""
  if huge_pages_wanted(config):
    restart_with_huge_pages()


def restart_with_huge_pages() -> None:
  """Re-executes this same command line once, with glibc's `glibc.malloc.hugetlb=1` tunable set.

  glibc reads its tunables only at process start, so setting them from inside the process needs an exec. The
  PID, open files and signal dispositions stay the same. Nothing happens when:
    - `DPTRAIN_MALLOC=glibc` is set, or this process is already the restarted one;
    - GLIBC_TUNABLES already chooses `glibc.malloc.hugetlb`;
    - the C library is not glibc;
    - the kernel's transparent huge pages are not in `madvise` mode (`always` already gives them, `never`
      refuses them).
  """
  if os.environ.get('DPTRAIN_MALLOC', '') == 'glibc' or _RESTARTED in os.environ:
    return
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables or platform.libc_ver()[0] != 'glibc' or not _own_command_line():
    return
  try:
    with open(_THP_MODE) as f:
      if '[madvise]' not in f.read():
        return
  except OSError:
    return
  env = dict(os.environ, GLIBC_TUNABLES=f'{tunables}:{_HUGETLB}' if tunables else _HUGETLB)
  env[_RESTARTED] = tunables
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
  except OSError:  # No executable to restart (an embedded interpreter): go on without huge pages.
    pass


def _own_command_line() -> bool:
  """Whether re-running `sys.orig_argv` re-runs this program: its arguments end the interpreter's command line.
  Not so inside another program that patched `sys.argv` (a notebook kernel running train.py via runpy)."""
  if not hasattr(sys, 'orig_argv') or len(sys.argv) < 2:
    return False
  return sys.orig_argv[len(sys.orig_argv) - len(sys.argv) + 1:] == sys.argv[1:]


def glibc_default_env() -> dict:
  """This process's environment for a child that must run on glibc's defaults (the seed's reference loop)."""
  env = dict(os.environ, DPTRAIN_MALLOC='glibc')
  if _RESTARTED in env:
    original = env.pop(_RESTARTED)
    if original:
      env['GLIBC_TUNABLES'] = original
    else:
      env.pop('GLIBC_TUNABLES', None)
  return env

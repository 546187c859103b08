"""cpu_kernels/malloc.py: the mallopt thresholds apply on glibc, and the huge-page restart re-executes the
same command exactly once, keeps its arguments, and can be turned off."""

import os
import platform
import subprocess
import sys

import pytest

from cpu_kernels import malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt and tunables are glibc-only')

# Prints one line per start: a restart that failed to happen, or happened twice, shows in the line count.
_PROBE = ('import os, sys; from cpu_kernels import malloc; print("start", flush=True); '
          'malloc.restart_with_huge_pages(); '
          'print(os.environ.get("GLIBC_TUNABLES", "-"), sys.argv[1:], os.getpid(), flush=True)')


def _probe(env_extra, *args):
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'DPTRAIN_MALLOC', malloc._RESTARTED)}
  env.update(env_extra)
  out = subprocess.run([sys.executable, '-c', _PROBE, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60, check=True).stdout.splitlines()
  return out


def _thp_madvise() -> bool:
  try:
    with open(malloc._THP_MODE) as f:
      return '[madvise]' in f.read()
  except OSError:
    return False


@glibc_only
def test_thresholds_apply_on_glibc():
  assert malloc.keep_freed_memory() is True


@glibc_only
def test_restart_sets_the_tunable_once_and_keeps_the_arguments():
  if not _thp_madvise():
    pytest.skip('transparent huge pages are not in madvise mode here: the restart is skipped by design')
  out = _probe({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}, '--a=1', 'b c')
  assert out[:2] == ['start', 'start'] and len(out) == 3, out  # Two starts (the exec), one finish.
  tunables, rest = out[2].split(' ', 1)
  assert tunables == 'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1'
  assert "['--a=1', 'b c']" in rest


@glibc_only
def test_restart_is_off_with_dptrain_malloc_glibc_or_a_chosen_tunable():
  out = _probe({'DPTRAIN_MALLOC': 'glibc'})
  assert len(out) == 2 and out[1].startswith('- '), out  # One start: no restart.
  out = _probe({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert len(out) == 2 and out[1].startswith('glibc.malloc.hugetlb=0 '), out


def test_reference_env_restores_the_original_tunables(monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1')
  monkeypatch.setenv(malloc._RESTARTED, 'glibc.malloc.arena_max=4')
  env = malloc.glibc_default_env()
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=4' and env['DPTRAIN_MALLOC'] == 'glibc'
  assert malloc._RESTARTED not in env
  monkeypatch.setenv(malloc._RESTARTED, '')
  assert 'GLIBC_TUNABLES' not in malloc.glibc_default_env()


def test_huge_pages_by_config():
  from benchmarks import kit
  c = kit.config()
  wanted = lambda **kw: malloc.huge_pages_wanted(_with(c, **kw))
  assert not wanted()  # Opt-in: the default re-executes nothing, on any platform.
  assert not wanted(model='mlp') and not wanted(model='resnet18') and not wanted(model='vit_ti')
  assert wanted(huge_pages='on') and not wanted(model='resnet50', huge_pages='off')
  from configs import fashion_mnist_resnet
  assert malloc.huge_pages_wanted(fashion_mnist_resnet.get_config())  # The CPU recipe measured with them.


def _with(config, **overrides):
  c = config.copy_and_resolve_references()
  c.update(overrides)
  return c


@glibc_only
def test_no_restart_inside_another_program():
  """A host program that patched sys.argv (a notebook running train.py) must not be re-executed."""
  if not _thp_madvise():
    pytest.skip('transparent huge pages are not in madvise mode here')
  code = ('import sys; sys.argv = ["train.py", "--config=x"]; from cpu_kernels import malloc; print("start", '
          'flush=True); malloc.restart_with_huge_pages(); print("end", flush=True)')
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'DPTRAIN_MALLOC', malloc._RESTARTED)}
  out = subprocess.run([sys.executable, '-c', code, '--other'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60, check=True).stdout.splitlines()
  assert out == ['start', 'end'], out

"""Quiet on any CPU: no entry point prints TensorFlow's or absl's C++ start-up notices.

Which notices TensorFlow prints depends on the CPU model (oneDNN's notice appears on CPUs with AVX-512 VNNI
or AMX), so these tests run every entry point in a user's environment (none of `libenv.QUIET` set) and
look for the notices themselves; on a CPU that never prints them the tests still check that each entry
point sets the variables before TensorFlow loads.
"""

import os
import subprocess
import sys

import pytest

import libenv
from tests.harness import ROOT, run_train

NOTICES = ('oneDNN custom operations', 'absl::InitializeLog', 'cpu_feature_guard', 'This TensorFlow binary')
ENTRY_MODULES = sorted(f'benchmarks.{f[:-3]}' for f in os.listdir(os.path.join(ROOT, 'benchmarks'))
                       if f.endswith('.py') and f != '__init__.py')


def _user_env():
  return {k: v for k, v in os.environ.items() if k not in libenv.QUIET and k != 'XLA_FLAGS'}


def test_verbose_in_reads_argv_as_absl_does():
  assert libenv.verbose_in(['train.py', '--verbose'])
  assert not libenv.verbose_in(['train.py', '--verbose', '--noverbose'])
  assert libenv.verbose_in(['train.py', '--verbose=true']) and not libenv.verbose_in(['train.py', '--verbose=0'])


@pytest.mark.slow
@pytest.mark.parametrize('module', ENTRY_MODULES)
def test_benchmark_entry_points_quiet_tensorflow_before_it_loads(module):
  """Importing the benchmark module (as `python -m` does) then TensorFlow, TFDS and a tf.data op: no notice."""
  code = (f'import runpy, sys; sys.argv = ["{module}"]; import {module}; import os; '
          'assert os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0", "libenv not applied"; '
          'import tensorflow as tf, tensorflow_datasets; '
          'list(tf.data.Dataset.range(4).map(lambda x: tf.image.resize(tf.zeros([8, 8, 1]), [4, 4])))')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=_user_env(), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not [line for line in proc.stderr.splitlines() if any(n in line for n in NOTICES)], proc.stderr


@pytest.mark.slow
def test_train_py_prints_no_native_notice(fake_mnist_dir, tmp_path):
  """A whole (tiny) run in a user's environment: stderr holds no TensorFlow/absl start-up notice."""
  proc = run_train(str(tmp_path / 'run'), f'--config.data_dir={fake_mnist_dir}', '--config.num_epochs=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  noisy = [line for line in (proc.stdout + proc.stderr).splitlines() if any(n in line for n in NOTICES)]
  assert not noisy, noisy

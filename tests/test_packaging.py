"""Packaging: the wheel installs dependencies only (no generic top-level names in site-packages), and
train.py runs from the checkout however it is started."""

import os
import subprocess
import sys
import zipfile

import pytest

from tests import harness
from tests.conftest import make_fake_mnist

pytestmark = pytest.mark.slow


def test_wheel_installs_no_top_level_modules(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
                         '-w', str(tmp_path), harness.ROOT], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  [wheel] = [f for f in os.listdir(tmp_path) if f.endswith('.whl')]
  names = zipfile.ZipFile(tmp_path / wheel).namelist()
  assert names and all('.dist-info/' in n for n in names), names  # Metadata only: nothing lands on sys.path.


def test_train_py_through_runpy_without_cwd_on_path(tmp_path):
  """`runpy.run_path('train.py')` with `-P` (no cwd on sys.path): train.py must find its own modules."""
  data = make_fake_mnist(str(tmp_path / 'data'), num_train=128, num_test=16)
  code = ('import runpy, sys; sys.argv = ["train.py"] + sys.argv[1:]; '
          'runpy.run_path("train.py", run_name="__main__")')
  args = [f'--config={harness.TINY}', f'--workdir={tmp_path / "w"}', f'--config.data_dir={data}',
          '--config.num_epochs=1']
  proc = subprocess.run([sys.executable, '-P', '-c', code, *args], cwd=harness.ROOT, env=harness._env(),
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert harness.metrics(str(tmp_path / 'w'))[-1]['kind'] == 'eval'

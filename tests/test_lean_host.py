"""train.py on a lean accelerator host's package set: JAX, Flax, Optax, Orbax and what they need, plus
ml_collections (brought along as a wheel), and no TensorFlow, TFDS, clu or TensorBoard.

The environment is this venv's site-packages seen through symlinks to exactly those distributions (their
installed files, from the packaging metadata), run with `python -S`, so nothing else is importable.
"""

import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys

import pytest

from tests import harness

pytestmark = pytest.mark.slow

# What the GPU host has (benchmarks/device_check.py's instructions), and the one wheel brought along.
HOST_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'ml-collections')
ABSENT = ('tensorflow', 'tensorflow_datasets', 'tensorboard', 'clu')


def distributions(roots):
  """The installed distributions `roots` need, transitively (extras left out)."""
  seen, todo = {}, list(roots)
  while todo:
    name = re.split(r'[ ;<>=!~\[(]', todo.pop(), maxsplit=1)[0].lower().replace('_', '-')
    if name in seen:
      continue
    try:
      seen[name] = metadata.distribution(name)
    except metadata.PackageNotFoundError:
      continue
    todo += [r for r in seen[name].requires or [] if 'extra ==' not in r]
  return seen


def lean_site(directory, packages=HOST_PACKAGES) -> str:
  """A directory of symlinks to the top-level entries that `packages` (and what they need) installed."""
  os.makedirs(directory)
  for dist in distributions(packages).values():
    for f in dist.files or []:
      top = f.parts[0]
      target = os.path.join(str(dist.locate_file('')), top)
      link = os.path.join(directory, top)
      if top not in ('..', '__pycache__') and not os.path.lexists(link) and os.path.exists(target):
        os.symlink(target, link)
  return directory


RUN = """
import importlib.util, runpy, sys
missing = [m for m in {absent!r} if importlib.util.find_spec(m) is not None]
assert not missing, f'importable here: {{missing}}'
try:
  import tensorflow
  raise AssertionError('tensorflow imported')
except ImportError:
  pass
sys.argv = {argv!r}
runpy.run_path({train!r}, run_name='__main__')
"""


def test_train_runs_on_a_host_without_tensorflow(tmp_path):
  site = lean_site(str(tmp_path / 'site'))
  workdir = str(tmp_path / 'run')
  argv = harness.train_cmd(workdir, '--config.data_source=synthetic', '--config.synthetic_train_examples=256',
                           '--config.synthetic_eval_examples=40', '--config.num_epochs=2',
                           '--config.plot=False')[1:]
  code = RUN.format(absent=ABSENT, argv=argv, train=argv[0])
  env = dict(harness._env(), PYTHONPATH=os.pathsep.join([site, harness.ROOT]))
  proc = subprocess.run([sys.executable, '-S', '-c', code], cwd=harness.ROOT, env=env, capture_output=True, text=True,
                        timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count('TensorBoard events are off') == 1, proc.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, 'tensorboard'))
  events = harness.metrics(workdir)
  evals = [e for e in events if e['kind'] == 'eval']
  assert [e['step'] for e in evals] == [4, 8] and evals[-1]['test_examples'] == 40, events
  assert harness.checkpoint_steps(workdir)[-1] == 8
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['data_source'] == 'synthetic'


def test_tf_data_source_without_tensorflow_is_one_line(tmp_path, fake_mnist_dir):
  site = lean_site(str(tmp_path / 'site'))
  argv = harness.train_cmd(str(tmp_path / 'run'), '--config.data_source=idx', f'--config.data_dir={fake_mnist_dir}')[1:]
  code = RUN.format(absent=ABSENT, argv=argv, train=argv[0])
  env = dict(harness._env(), PYTHONPATH=os.pathsep.join([site, harness.ROOT]))
  proc = subprocess.run([sys.executable, '-S', '-c', code], cwd=harness.ROOT, env=env, capture_output=True, text=True,
                        timeout=240)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --config.data_source=idx, tfds and folder read data with tf.data, and TensorFlow is not installed '
      'here: `pip install tensorflow`, or use --config.data_source=synthetic'), proc.stderr[-3000:]

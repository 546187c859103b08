"""Runs train.py as a real subprocess (the user's entry point) and reads what it leaves behind."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

import libenv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.py')


def _env():
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  for name in libenv.QUIET:  # Children start as a user's shell does: train.py must quiet the libraries itself.
    env.pop(name, None)
  env.pop('XLA_FLAGS', None)  # The parent's 8-device flags must not leak into the child.
  for name in ('EPATH_USE_TF', 'TENSORSTORE_GCS_HTTP_URL'):  # train.py sets them from what a user sets.
    env.pop(name, None)
  return env


def train_cmd(workdir, *args, config=TINY):
  return [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={config}', f'--workdir={workdir}', *args]


def run_train(workdir, *args, config=TINY, timeout=240, **popen) -> subprocess.CompletedProcess:
  """`popen`: more subprocess arguments (e.g. a `preexec_fn` that sets a resource limit)."""
  return subprocess.run(train_cmd(workdir, *args, config=config), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=timeout, **popen)


def start_train(workdir, *args, config=TINY, log_path=None, env=None) -> subprocess.Popen:
  """`env`: variables set for this process only (e.g. its own TMPDIR and HOME)."""
  out = open(log_path, 'w') if log_path else subprocess.DEVNULL
  return subprocess.Popen(train_cmd(workdir, *args, config=config), cwd=ROOT, env=dict(_env(), **(env or {})),
                          stdout=out, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def metrics(workdir):
  """The events of WORKDIR/metrics.jsonl (a local path or a bucket URL); [] when there is none yet."""
  import storage
  try:
    text = storage.read_text(storage.join(workdir, 'metrics.jsonl'))
  except FileNotFoundError:
    return []
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_for(predicate, timeout=120, interval=0.01):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    time.sleep(interval)
  return False


def checkpoint_steps(workdir):
  import storage
  return sorted(int(n) for n in storage.listdir(storage.join(workdir, 'checkpoints')) if n.isdigit())


def workdir_files(workdir) -> dict:
  """{relative path: SHA-256} of every file under `workdir`, but .lock (it names its last holder's pid)."""
  import hashlib
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      if name != '.lock' and os.path.isfile(path):
        with open(path, 'rb') as f:
          out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return dict(sorted(out.items()))


def load_checkpoint(workdir, step=None) -> dict:
  """Flat {path: numpy array} of a saved train state (read on the host, no devices needed). A bucket's is read
  in a fresh process, as train.py reads it: the libraries fix their storage route and endpoint at first use, so
  a test process that met another server (or TensorFlow's route) earlier would read elsewhere."""
  import storage
  step = step if step is not None else checkpoint_steps(workdir)[-1]
  if storage.is_url(workdir):
    import pickle
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'state.pkl')
      subprocess.run([sys.executable, '-m', 'tests.harness', workdir, str(step), out], cwd=ROOT, env=_env(),
                     check=True, timeout=120)
      with open(out, 'rb') as f:
        return pickle.load(f)
  return _load_local(workdir, step)


def _load_local(workdir, step) -> dict:
  import orbax.checkpoint as ocp

  import storage
  from storage import orbax_route
  storage.configure()
  orbax_route.install()  # s3:// checkpoints, as trainer/checkpoints.py reads them.
  path = storage.join(workdir, 'checkpoints', str(step), 'state')
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, 'item_metadata') else meta.tree
    import jax
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ckptr.restore(path, restore_args=restore_args)
  import jax
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}


def assert_states_close(a: dict, b: dict, atol=1e-6):
  assert a.keys() == b.keys(), (sorted(a), sorted(b))
  worst = max((float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))), k) for k in a)
  assert worst[0] <= atol, f'largest difference {worst[0]:.3g} at {worst[1]}'


if __name__ == '__main__':  # python -m tests.harness WORKDIR STEP OUT.pkl: load_checkpoint in a fresh process.
  import pickle
  with open(sys.argv[3], 'wb') as f:
    pickle.dump(_load_local(sys.argv[1], int(sys.argv[2])), f)

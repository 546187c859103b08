"""Two processes with no shared filesystem: jax.distributed on 127.0.0.1, each process with its own TMPDIR,
HOME and cache, sharing only a gs:// workdir on a real fake-gcs-server. Killed after a checkpoint and
resumed, they end where one uninterrupted process ends."""

import os
import signal

import pytest

import storage
from tests import harness
from tests.conftest import make_fake_mnist

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope='module')
def env(gcs_server):
  with pytest.MonkeyPatch.context() as mp:
    for k, v in gcs_server.env.items():
      mp.setenv(k, v)
    yield gcs_server


def _start_pair(workdir, *args, homes, logs):
  port = harness.free_port()
  return [harness.start_train(workdir, '--num_cpu_devices=4', f'--coordinator_address=127.0.0.1:{port}',
                              '--num_processes=2', f'--process_id={i}', *args, log_path=logs[i],
                              env={'TMPDIR': homes[i], 'HOME': homes[i],
                                   'DPTRAIN_CACHE_DIR': os.path.join(homes[i], 'cache')})
          for i in (0, 1)]


def _committed(workdir) -> list[int]:
  """Steps Orbax finished writing: on Cloud Storage it marks a step complete with commit_success.txt last."""
  d = storage.join(workdir, 'checkpoints')
  return sorted(int(n) for n in storage.listdir(d)
                if n.isdigit() and storage.exists(storage.join(d, n, 'commit_success.txt')))


def test_two_processes_share_only_a_bucket_workdir_kill_and_resume(env, tmp_path):
  data = make_fake_mnist(str(tmp_path / 'data'), num_train=512, num_test=100)
  args = (f'--config.data_dir={data}', '--config.num_epochs=3', '--config.checkpoint_every_steps=4',
          '--config.workdir_lease_s=10')
  single = f'gs://{env.new_bucket()}/single'
  proc = harness.run_train(single, '--num_cpu_devices=8', *args, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]

  workdir = f'gs://{env.new_bucket()}/multi'
  homes = [str(tmp_path / f'host{i}') for i in (0, 1)]
  for h in homes:
    os.makedirs(h)
  logs = [str(tmp_path / f'p{i}.log') for i in (0, 1)]
  procs = _start_pair(workdir, *args, homes=homes, logs=logs)
  assert harness.wait_for(lambda: any(s >= 8 for s in _committed(workdir))
                          or any(p.poll() is not None for p in procs), timeout=300, interval=0.2)
  assert all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:] + open(logs[1]).read()[-3000:]
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()
  last = max(_committed(workdir))
  assert last < 24, last

  logs = [str(tmp_path / f'r{i}.log') for i in (0, 1)]
  procs = _start_pair(workdir, *args, homes=homes, logs=logs)
  codes = [p.wait(timeout=400) for p in procs]
  assert codes == [0, 0], open(logs[0]).read()[-3000:] + open(logs[1]).read()[-3000:]
  resumed = open(logs[0]).read()
  assert f'resuming at step {last}' in resumed and 'its process is gone' in resumed, resumed[-3000:]
  harness.assert_states_close(harness.load_checkpoint(single), harness.load_checkpoint(workdir), atol=1e-5)
  evals = lambda w: [(e['step'], e['test_examples']) for e in harness.metrics(w) if e['kind'] == 'eval']
  assert evals(workdir)[-1] == evals(single)[-1] == (24, 100), (evals(workdir), evals(single))
  for h in homes:  # Nothing of the run's state on a local disk: no checkpoints, no workdir made from the URL.
    found = [os.path.join(r, d) for r, ds, _ in os.walk(h) for d in ds if d in ('checkpoints', 'gs:')]
    assert not found, found

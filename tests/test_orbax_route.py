"""storage/orbax_route.py: an `s3://` checkpoint is Orbax's `gs://` spec on tensorstore's S3 driver, committed
with commit_success.txt; saved, listed, pruned and restored through Orbax against a real moto server."""

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import storage
from storage import orbax_route


def test_each_cloud_storage_store_of_a_spec_becomes_an_s3_store(monkeypatch):
  monkeypatch.setenv('AWS_ENDPOINT_URL', 'http://127.0.0.1:9')
  monkeypatch.setenv('AWS_REGION', 'eu-west-1')
  spec = {'driver': 'ocdbt', 'path': 'w', 'base': {'driver': 'kvstack', 'layers': [
      {'driver': 'gcs', 'bucket': 'b', 'path': 'run/checkpoints/1/state/'},
      {'driver': 'file', 'path': '/tmp/meta/'}]}}
  got = orbax_route.s3_spec(spec)
  assert got['driver'] == 'ocdbt' and got['path'] == 'w'
  assert got['base']['layers'] == [
      {'driver': 's3', 'bucket': 'b', 'path': 'run/checkpoints/1/state/', 'endpoint': 'http://127.0.0.1:9',
       'aws_region': 'eu-west-1'},
      {'driver': 'file', 'path': '/tmp/meta/'}]
  assert orbax_route.temporary_path_class('gs://b/c') is None and orbax_route.temporary_path_class('/c') is None


def test_orbax_saves_prunes_and_restores_an_s3_directory(s3_bucket):
  storage.configure()
  orbax_route.install()
  directory = f'{s3_bucket}/run/checkpoints'
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         temporary_path_class=orbax_route.temporary_path_class(directory))
  state = {'w': jnp.arange(6.0), 'b': jnp.ones((2, 3))}
  with ocp.CheckpointManager(directory, options=options) as manager:
    for step in (1, 2, 3):
      manager.save(step, args=ocp.args.StandardSave({k: v * step for k, v in state.items()}))
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
  assert storage.listdir(directory) == ['2', '3']
  assert storage.exists(f'{directory}/3/commit_success.txt')
  assert any(k.startswith('3/default/d/') for k in storage.walk_files(directory))  # The arrays are in S3.
  with ocp.CheckpointManager(directory, options=options) as manager:
    restored = manager.restore(3, args=ocp.args.StandardRestore(state))
  np.testing.assert_array_equal(restored['w'], np.arange(6.0) * 3)
  np.testing.assert_array_equal(restored['b'], np.ones((2, 3)) * 3)


def test_configure_overrides_epaths_cached_choice_of_tensorflow(monkeypatch):
  """epath caches whether to use tf.io.gfile at its first URL; configure() must win even when it comes later."""
  from etils.epath import backend, gpath
  monkeypatch.delenv('EPATH_USE_TF', raising=False)
  gpath._is_tf_installed.cache_clear()
  assert gpath._is_tf_installed()  # TensorFlow is installed: epath would route s3:// to tf.io.gfile.
  storage.configure()
  assert gpath.PosixGPath('s3://b/run')._backend is backend.fsspec_backend

"""Test set-up: 8 simulated CPU devices (before JAX's backend starts) and small fake datasets."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import libenv  # noqa: E402

libenv.set_defaults()  # The tests import TensorFlow in-process too: the same quiet start as every entry point.

from parallel import topology  # noqa: E402

topology.configure_backend('cpu', 8, collective_timeout_s=60)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from input_pipeline import idx  # noqa: E402


def make_fake_mnist(directory: str, num_train: int = 512, num_test: int = 100, seed: int = 0,
                    gz: bool = True) -> str:
  """Writes a learnable 10-class, 28x28 IDX dataset: class k lights up row band k."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  suffix = '.gz' if gz else ''
  for split, n in (('train', num_train), ('test', num_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
      images[i, 2 + 2 * k: 4 + 2 * k, :] += 150
    img_name, lbl_name = idx.SPLIT_FILES[split]
    idx.write_idx(os.path.join(directory, img_name + suffix), images)
    idx.write_idx(os.path.join(directory, lbl_name + suffix), labels)
  return directory


@pytest.fixture
def fake_mnist_dir(tmp_path):
  return make_fake_mnist(str(tmp_path / 'fake_mnist'))


@pytest.fixture(scope='session')
def gcs_server():
  """A real fake-gcs-server on a free port, for the whole session (each test takes its own bucket)."""
  from tests import storage_servers
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')  # As storage.configure() does (emulator).
  server = storage_servers.start_gcs()
  yield server
  server.stop()


@pytest.fixture(scope='session')
def s3_server():
  """A real moto S3 server on a free port, for the whole session (each test takes its own bucket)."""
  from tests import storage_servers
  server = storage_servers.start_s3()
  yield server
  server.stop()


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch):
  """gs://BUCKET of a new bucket, with STORAGE_EMULATOR_HOST (alone, as a user sets it) pointing at the server."""
  for k, v in gcs_server.env.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv('EPATH_USE_TF', 'false')
  return f'gs://{gcs_server.new_bucket()}'


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
  """s3://BUCKET of a new bucket, with AWS_ENDPOINT_URL and dummy credentials pointing at the server."""
  for k, v in s3_server.env.items():
    monkeypatch.setenv(k, v)
  return f's3://{s3_server.new_bucket()}'

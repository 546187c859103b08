"""Do the same per-slice programs give the same bits under 1, 2, 4, 8 simulated CPU devices?

Runs itself once per device count (the count is fixed when JAX starts) and prints one digest per check:
  single: jit forward+backward of the CNN on one fixed 16-example slice, on device 0 alone;
  scan:   the same for V=8 slices of 16 under shard_map, each device scanning its V/n slices (per-slice
          gradients gathered to the host in slice order).
Equal digests across counts = equal bits. `python benchmarks/determinism_probe.py` prints a table.
A bitwise check of single programs, not a timing: it does not run `trainer.loop.Trainer`.
"""

import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, S = 8, 16


def _digest(tree):
  import jax
  import numpy as np
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:12]


def child(n: int, kernels: str) -> None:
  sys.path.insert(0, ROOT)
  from parallel import topology
  topology.configure_backend('cpu', n)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax
  from jax.sharding import PartitionSpec as P

  import models
  from benchmarks import kit
  from parallel import mesh as mesh_lib

  config = kit.config(cpu_kernels=kernels)
  model = models.create_model(config, num_classes=10)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(V, S, 28, 28, 1)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 10, (V, S)))
  variables = model.init(jax.random.key(0), images[0], train=False)

  def slice_grads(variables, x, y):
    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
      return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(S), y])
    return jax.value_and_grad(loss)(variables['params'])

  single = jax.jit(slice_grads)(variables, images[0], labels[0])
  mesh = mesh_lib.make_mesh()

  def per_device(variables, xs, ys):  # xs: [V/n, S, ...]
    return lax.scan(lambda c, b: (c, slice_grads(variables, *b)), None, (xs, ys))[1]
  scanned = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(mesh_lib.AXIS), P(mesh_lib.AXIS)),
                                  out_specs=P(mesh_lib.AXIS), check_vma=False))(
      jax.device_put(variables, mesh_lib.replicated(mesh)),
      *jax.device_put((images, labels), mesh_lib.batch_sharding(mesh)))
  first = jax.tree.map(lambda a: np.asarray(a)[0], scanned)
  print(f'{n} {_digest(single)} {_digest(scanned)} {np.array_equal(_flat(single), _flat(first))}')


def _flat(tree):
  import jax
  import numpy as np
  return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


def main():
  if len(sys.argv) > 1:
    return child(int(sys.argv[1]), sys.argv[2])
  extra = os.environ.get('PROBE_XLA_FLAGS', '')
  settings = os.environ.get('PROBE_KERNELS', 'off,auto')  # cpu_kernels settings
  for kernels in settings.split(','):
    print(f'cpu_kernels={kernels} XLA_FLAGS+={extra!r}\n  n single scan scan[0]==single')
    for n in map(int, os.environ.get('PROBE_COUNTS', '1,2,4,8').split(',')):
      env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' ' + extra).strip())
      out = subprocess.run([sys.executable, __file__, str(n), kernels], env=env, capture_output=True,
                           text=True)
      print('  ' + (out.stdout.strip() or out.stderr.strip()[-500:]), flush=True)


if __name__ == '__main__':
  main()

"""The seed's loop, exactly as written (the Flax MNIST example's `train_epoch`): the benchmark's baseline row.

  - the whole train split is one float32 `jnp` array on the device, scaled once (`/ 255.`);
  - each epoch's order is `jax.random.permutation` on the device, and every batch is gathered by indexing
    the device array (`train_images[perm]`, an eager dispatch per batch);
  - one `jax.jit` for loss + gradients (`apply_model`), a second for the optax update (`update_model`);
  - the per-step loss stays on the device in a list and is averaged at the end of the epoch, so the host
    never waits on a step inside an epoch (timed windows block once at their end, as an epoch end would).
The input wait column is empty for this row: its gather runs on the device, inside the step time.

Same model class (`models.cnn.CNN`, per-device BatchNorm), same optimizer and batch as the data-parallel
rows. Nothing here is used by the trainer; `benchmarks.throughput` imports `run` for its reference row.
It is the seed's loop by design, not `trainer.loop.Trainer`.
"""

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.cnn import CNN
from trainer.utilization import cost_flops


def make_steps(model, tx):
  """(loss_and_grads, update): the two jitted functions of the tutorial loop."""

  @jax.jit
  def loss_and_grads(params, batch_stats, images, labels):
    def loss_fn(p):
      logits, updates = model.apply({'params': p, 'batch_stats': batch_stats}, images, train=True,
                                    mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, new_stats

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return loss_and_grads, update


def run(images: np.ndarray, labels: np.ndarray, *, batch: int, warmup_s: float = 1.0, window_s: float = 2.0,
        windows: int = 5, seed: int = 0, learning_rate: float = 0.01, momentum: float = 0.99,
        device: jax.Device | None = None, variables: dict | None = None) -> dict:
  """Trains with the seed's loop and times it: images/sec (median of `windows` windows after warm-up).

  `variables` ({'params', 'batch_stats'}, e.g. host copies of the trainer's initial state) skips the init.
  """
  device = device or jax.devices()[0]
  model = CNN(num_classes=int(labels.max()) + 1)
  tx = optax.sgd(learning_rate, momentum=momentum)
  with jax.default_device(device):
    if variables is None:
      # Jitted init: eager init dispatches (and compiles) every initializer op one by one, seconds here.
      variables = jax.jit(functools.partial(model.init, train=False))(
          jax.random.PRNGKey(seed), jnp.zeros((1,) + images.shape[1:], jnp.float32))
    params = jax.device_put(variables['params'], device)
    batch_stats = jax.device_put(variables['batch_stats'], device)
    opt_state = tx.init(params)
    train_images = jax.device_put(jnp.float32(images) / 255.0, device)  # The dataset as a jnp array.
    train_labels = jax.device_put(jnp.asarray(labels), device)
  loss_and_grads, update = make_steps(model, tx)
  steps_per_epoch = len(images) // batch
  rng = jax.random.PRNGKey(seed)

  def epoch_perms():
    nonlocal rng
    rng, key = jax.random.split(rng)
    with jax.default_device(device):
      perms = jax.random.permutation(key, len(images))[:steps_per_epoch * batch]
      return iter(perms.reshape((steps_per_epoch, batch)))

  perms, epoch_loss = epoch_perms(), []

  def step():
    nonlocal params, batch_stats, opt_state, perms, epoch_loss
    perm = next(perms, None)
    if perm is None:  # End of the epoch: the seed averages the epoch's losses here (its only host sync).
      float(np.mean(jax.device_get(epoch_loss)))
      perms, epoch_loss = epoch_perms(), []
      perm = next(perms)
    with jax.default_device(device):
      x, y = train_images[perm, ...], train_labels[perm, ...]
      loss, grads, batch_stats = loss_and_grads(params, batch_stats, x, y)
      params, opt_state = update(params, opt_state, grads)
    epoch_loss.append(loss)

  def sync():
    jax.block_until_ready(params)

  t = time.perf_counter()
  step()
  sync()
  compile_s = time.perf_counter() - t

  t0 = time.perf_counter()
  warm = 0
  while warm < 3 or time.perf_counter() - t0 < warmup_s:
    step()
    warm += 1
  sync()
  per_step = (time.perf_counter() - t0) / warm
  n = max(2, int(round(window_s / per_step)))
  times, cpus = [], []
  for _ in range(windows):
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
      step()
    sync()
    times.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)

  with jax.default_device(device):
    x0, y0 = train_images[:batch], train_labels[:batch]
    grads_args = (params, batch_stats, x0, y0)
    flops = cost_flops(loss_and_grads.lower(*grads_args).compile())
    _, grads, _ = loss_and_grads(*grads_args)
    flops += cost_flops(update.lower(params, opt_state, grads).compile())
  med = statistics.median(times)
  return {'backend': 'reference', 'devices': 1, 'batch': batch, 'images_per_s': n * batch / med,
          'ms_per_step': 1e3 * med / n, 'input_wait': None,
          'cpu_cores': sum(cpus) / sum(times), 'compile_s': compile_s, 'flops_per_step': flops,
          'steps_per_window': n, 'window_s': times, 'final_loss': float(epoch_loss[-1] if epoch_loss else 0.0),
          'images_per_s_windows': [n * batch / w for w in times]}

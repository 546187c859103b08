"""The plain single-device training loop most JAX/Flax tutorials show: the baseline row of the benchmark.

  - one `jax.jit` for loss + gradients (`jax.value_and_grad`), a second `jax.jit` for the optax update;
  - the batch is gathered on the host with numpy fancy indexing and scaled there (`images[idx] / 255.0`,
    float64, converted to float32 when it is passed to the jitted function);
  - the host-side gather/scale time is what the `input_wait` column shows for this row;
  - the loss is fetched to the host (`float(loss)`) every step, so the host waits for every step.

Same model class (`models.cnn.CNN`, per-device BatchNorm), same optimizer and batch as the data-parallel
rows. Nothing here is used by the trainer; `benchmarks.throughput` imports `run` for its reference row.
"""

import functools
import statistics
import time
from typing import Optional

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
        device: Optional[jax.Device] = None, variables: Optional[dict] = None) -> dict:
  """Trains with the tutorial loop and times it: images/sec (median of `windows` windows after warm-up).

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
  loss_and_grads, update = make_steps(model, tx)

  rng = np.random.default_rng(seed)
  steps_per_epoch = len(images) // batch
  perm, pos = rng.permutation(len(images)), 0

  def next_batch():
    nonlocal perm, pos
    if pos == steps_per_epoch:
      perm, pos = rng.permutation(len(images)), 0
    idx = perm[pos * batch:(pos + 1) * batch]
    pos += 1
    return images[idx] / 255.0, labels[idx]

  losses, input_s = [], [0.0]

  def step():
    nonlocal params, batch_stats, opt_state
    t = time.perf_counter()
    x, y = next_batch()
    input_s[0] += time.perf_counter() - t
    with jax.default_device(device):
      loss, grads, batch_stats = loss_and_grads(params, batch_stats, x, y)
      params, opt_state = update(params, opt_state, grads)
    losses.append(float(loss))  # The host waits for every step here.

  x0, y0 = next_batch()
  t = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t

  t0 = time.perf_counter()
  warm = 0
  while warm < 3 or time.perf_counter() - t0 < warmup_s:
    step()
    warm += 1
  per_step = (time.perf_counter() - t0) / warm
  n = max(2, int(round(window_s / per_step)))
  times, waits, cpus = [], [], []
  for _ in range(windows):
    t, w, c = time.perf_counter(), input_s[0], time.process_time()
    for _ in range(n):
      step()
    times.append(time.perf_counter() - t)
    waits.append(input_s[0] - w)
    cpus.append(time.process_time() - c)

  with jax.default_device(device):
    grads_args = (params, batch_stats, jnp.asarray(x0, jnp.float32), jnp.asarray(y0))
    flops = cost_flops(loss_and_grads.lower(*grads_args).compile())
    _, grads, _ = loss_and_grads(*grads_args)
    flops += cost_flops(update.lower(params, opt_state, grads).compile())
  med = statistics.median(times)
  return {'backend': 'reference', 'devices': 1, 'batch': batch, 'images_per_s': n * batch / med,
          'ms_per_step': 1e3 * med / n, 'input_wait': sum(waits) / sum(times),
          'cpu_cores': sum(cpus) / sum(times), 'compile_s': compile_s, 'flops_per_step': flops,
          'steps_per_window': n, 'window_s': times, 'final_loss': losses[-1],
          'images_per_s_windows': [n * batch / w for w in times]}

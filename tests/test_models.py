"""Model zoo and in-step recipe options: standard sizes, 1 vs 8 devices, gradient accumulation, EMA, weight-decay
mask, label smoothing. In-process on the 8 simulated CPU devices of conftest.py, narrow/shallow variants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import kit
from input_pipeline import sources
from models import create_model
from parallel import mesh as mesh_lib, steps
from trainer import job as job_lib, loop, optim

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


def _config(**overrides):
  return kit.config(small=True, **overrides)


def _data(shape=(16, 16, 1), n_train=64, n_test=24, seed=0):
  images, labels = kit.arrays(n_train + n_test, shape, seed=seed)
  return kit.dataset(images=images[:n_train], labels=labels[:n_train], test=(images[n_train:], labels[n_train:]))


def _batches(data, k, batch):
  """k global batches of `data`'s train split, scaled like the input pipeline."""
  rng = np.random.default_rng(1)
  out = []
  for _ in range(k):
    idx = rng.choice(len(data.train_labels), batch, replace=False)
    out.append({'image': data.train_images[idx].astype(np.float32) / 255, 'label': data.train_labels[idx]})
  return out


def _run(config, num_devices, data, batches, history=None):
  """Trains on `batches` with the trainer's own job; returns (job, canonical state, train losses). `history`, a
  list, receives the host params after each step."""
  job = job_lib.build(config, mesh=mesh_lib.make_mesh(num_devices), data=data)
  stepper, state = job.stepper, job.stepper.to_device(job.initial_state())
  lo, hi = mesh_lib.process_rows(job.mesh, config.batch_size)
  losses = []
  for batch in batches:
    state, metrics = stepper.train_step(state, stepper.place({k: v[lo:hi] for k, v in batch.items()}))
    losses.append(float(stepper.metrics(metrics)['loss_sum']))
    if history is not None:
      history.append(jax.device_get(state.params))
  return job, stepper.to_canonical(stepper.sync_batch_stats(state)), losses


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _max_diff(a, b):
  a, b = _flat(a), _flat(b)
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _num_params(model, px):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, px, px, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('name,expected', [('resnet18', 11_689_512), ('resnet34', 21_797_672),
                                           ('resnet50', 25_557_032), ('vit_ti', 5_717_032), ('vit_s', 22_049_896),
                                           ('vit_b', 86_566_120), ('vit_l', 304_324_584)])
def test_standard_sizes(name, expected):
  """At 224 px and 1000 classes the models have the published parameter counts (torchvision's ResNets; timm's
  ViT-Ti/S/B/L/16 less the class token and its position embedding, as these pool by averaging)."""
  assert _num_params(create_model(_config(model=name), num_classes=1000), 224) == expected


@pytest.mark.parametrize('px,stem,kernel', [(32, 'auto', 3), (96, 'auto', 7), (32, 'imagenet', 7), (96, 'small', 3)])
def test_stem(px, stem, kernel):
  model = create_model(_config(model='resnet18', stem=stem, resnet_width=8, resnet_stages='1'), num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, px, px, 3)), train=False))
  assert shapes['params']['stem_conv']['kernel'].shape[:2] == (kernel, kernel)


def test_v15_stride_on_the_3x3():
  """The first bottleneck of a strided stage strides in its 3x3 conv; its 1x1 convs keep the resolution."""
  model = create_model(_config(model='resnet50', resnet_width=8, resnet_stages='1,1'), num_classes=10)
  x = jnp.zeros((1, 32, 32, 1))

  def intermediates():
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    return model.apply(variables, x, train=False, capture_intermediates=True, mutable=['intermediates'])[1]

  convs = jax.eval_shape(intermediates)['intermediates']['Bottleneck_1']
  assert [convs[f'Conv_{i}']['__call__'][0].shape[1] for i in range(3)] == [32, 16, 16]


def test_patch_size_must_divide():
  from errors import UserError
  model = create_model(_config(model='vit_ti', patch_size=5, vit_depth=1), num_classes=10)
  with pytest.raises(ValueError, match='patch size 5 does not divide the 28x28 images'):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False))
  with pytest.raises(UserError, match='--config.patch_size=5 does not divide the 28x28 images'):  # Before tracing.
    job_lib.build(_config(model='vit_ti', patch_size=5, vit_depth=1), data=_data((28, 28, 1)))


@pytest.mark.slow
@pytest.mark.parametrize('overrides', [dict(model='resnet50', resnet_width=8, resnet_stages='1'),
                                       dict(model='vit_ti', patch_size=4, vit_depth=1, optimizer='adam',
                                            learning_rate=1e-3)],
                         ids=['resnet50', 'vit_ti'])
def test_model_one_vs_eight_devices(overrides):
  data = _data()
  config = _config(batch_size=32, eval_batch_size=8, **overrides)
  batches = _batches(data, 3, 32)
  job, ref, ref_losses = _run(config, 1, data, batches)
  if config.model.startswith('resnet'):  # Zero-initialised last BatchNorm scale in every residual block.
    block = job.initial_state().params['Bottleneck_0']
    assert not np.any(block['BatchNorm_2']['scale']) and np.all(block['BatchNorm_0']['scale'] == 1)
  _, got, losses = _run(config, 8, data, batches)
  assert _max_diff((ref.params, ref.batch_stats), (got.params, got.batch_stats)) < 1e-5
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] != losses[0]


@pytest.mark.slow
def test_resnet18_test_loss_one_vs_eight_devices_after_10_steps():
  """The done-when check: a narrow ResNet-18 with global BatchNorm, 10 steps, the same test loss on 1 and 8
  devices within 1e-4 (real Fashion-MNIST, 1,000 test images, where installed; else generated data)."""
  config = _config(model='resnet18', resnet_width=8, resnet_stages='1,1', batch_size=64, eval_batch_size=200)
  try:
    full = sources.load_idx('fashion_mnist', FASHION_MNIST)
    data = kit.dataset(images=full.train_images[:640], labels=full.train_labels[:640],
                       test=(full.test_images[:1000], full.test_labels[:1000]), source=full.source)
  except Exception:
    data = _data((28, 28, 1), n_train=640, n_test=1000)
  batches = _batches(data, 10, 64)
  results = []
  for n in (1, 8):
    job, state, _ = _run(config, n, data, batches)
    results.append(loop.evaluate(job, state))
  assert results[0]['test_examples'] == results[1]['test_examples'] == len(data.test_labels)
  assert abs(results[0]['test_loss'] - results[1]['test_loss']) < 1e-4
  assert 'test_top5_accuracy' in results[0] and results[0]['test_top5_accuracy'] >= results[0]['test_accuracy']


def test_micro_batches_are_strided_global_rows():
  """Micro-batch j holds the global rows g with g % k == j on every device count."""
  k, batch = 4, np.arange(32)
  for devices in (1, 2, 8):
    per = 32 // devices
    for d in range(devices):
      micro = np.asarray(steps.micro_batches({'x': batch[d * per:(d + 1) * per]}, k)['x'])
      assert all(np.all(micro[j] % k == j) for j in range(k))


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch():
  """No BatchNorm (ViT): 4 micro-batches of 8 == one batch of 32, within 1e-5, on 2 devices."""
  data = _data((8, 8, 1))
  batches = _batches(data, 2, 32)
  common = dict(model='vit_ti', patch_size=4, vit_depth=1, batch_size=32, eval_batch_size=8)
  _, big, big_losses = _run(_config(**common), 2, data, batches)
  _, acc, acc_losses = _run(_config(grad_accum_steps=4, **common), 2, data, batches)
  assert _max_diff(big.params, acc.params) < 1e-5
  np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
  assert abs(acc_losses[1] - acc_losses[0]) > 1e-3  # The first step changed the params.


def test_grad_accumulation_batch_must_split():
  from errors import UserError
  with pytest.raises(UserError, match='grad_accum_steps=3 micro-batches on each of 2 devices'):
    job_lib.build(_config(grad_accum_steps=3, batch_size=32, eval_batch_size=8), mesh=mesh_lib.make_mesh(2),
                  data=_data((8, 8, 1)))


@pytest.mark.slow
def test_ema_matches_hand_computation():
  data = _data((8, 8, 1))
  decay = 0.8
  config = _config(model='mlp', batch_size=16, eval_batch_size=8, ema_decay=decay)
  history = []
  job, state, _ = _run(config, 2, data, _batches(data, 3, 16), history)
  expected = jax.device_get(job.initial_state().params)
  for params in history:
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, expected, params)
  assert _max_diff(expected, state.ema_params) < 1e-6
  assert _max_diff(state.params, state.ema_params) > 1e-4
  # Eval reads the EMA: the same state with ema_params replaced by params evaluates differently.
  ema_eval = loop.evaluate(job, state)
  plain_eval = loop.evaluate(job, state.replace(ema_params=state.params))
  assert ema_eval['test_loss'] != plain_eval['test_loss']


def test_no_ema_leaves_the_state_unchanged():
  job = job_lib.build(_config(model='mlp', batch_size=16, eval_batch_size=8), mesh=mesh_lib.make_mesh(1),
                      data=_data((8, 8, 1)))
  assert jax.tree.leaves(job.initial_state().ema_params) == []


@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])
def test_weight_decay_touches_only_kernels(optimizer):
  """The MLP has Dense kernels and biases and BatchNorm scales and offsets: only the kernels decay."""
  model = create_model(_config(model='mlp'), num_classes=10)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)), train=False))()['params']
  params = jax.tree.map(lambda p: p + 1.0, params)  # Non-zero everywhere (biases and BN offsets start at 0).
  tx = optim.make_optimizer(_config(optimizer=optimizer, weight_decay=0.1, momentum=0.0), 10)
  updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p))(params)
  changed = _flat(jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates))
  assert sorted(changed) == sorted(_flat(params)) and len(changed) == 6
  assert all(v == k.endswith("['kernel']") for k, v in changed.items()), changed
  assert sum(changed.values()) == 2


def test_label_smoothing_matches_optax_and_hand_formula():
  rng = np.random.default_rng(0)
  logits, labels, a = jnp.asarray(rng.standard_normal((6, 10)), jnp.float32), jnp.asarray(rng.integers(0, 10, 6)), 0.1
  got = steps.cross_entropy(logits, labels, a)
  ref = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 10), a))
  logp = jax.nn.log_softmax(logits)
  hand = -(1 - a) * logp[jnp.arange(6), labels] - a * logp.mean(-1)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  np.testing.assert_allclose(got, hand, rtol=1e-5)
  np.testing.assert_array_equal(steps.cross_entropy(logits, labels),
                                optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def test_learning_rate_per_256_images():
  assert optim.peak_learning_rate(_config(learning_rate=0.1, lr_per_256=True, batch_size=1024)) == pytest.approx(0.4)
  assert optim.peak_learning_rate(_config(learning_rate=0.1, batch_size=1024)) == 0.1


def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror():
  """Hand computation: loss and accuracy of (f(x) + f(mirror x)) / 2 over the test split, every example once
  (24 examples over 4 devices and eval batches of 16: the last batch is padded)."""
  data = _data((8, 8, 1))
  config = _config(model='mlp', batch_size=16, eval_batch_size=16, eval_flip=True)
  job, state, _ = _run(config, 4, data, _batches(data, 2, 16))
  got = loop.evaluate(job, state)
  images, labels = data.test_images.astype(np.float32) / 255, data.test_labels
  apply = lambda x: job.eval_model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x, train=False)
  logits = (apply(images) + apply(images[:, :, ::-1, :])) / 2
  assert got['test_examples'] == 24
  np.testing.assert_allclose(got['test_loss'], np.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, labels)), rtol=1e-5)
  assert got['test_accuracy'] == pytest.approx(np.mean(np.argmax(logits, -1) == labels))
  plain = loop.evaluate(job_lib.build(_config(model='mlp', batch_size=16, eval_batch_size=16), mesh=job.mesh,
                                      data=data), state)
  assert plain['test_loss'] != got['test_loss']

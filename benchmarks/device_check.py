"""One command that checks and measures the trainer on an accelerator host, with no TensorFlow and no network.

  python -m benchmarks.device_check [--platform=gpu] [--sizes=full|small] [--json=FILE] [--wheels=DIR]

Everything runs on `data_source=synthetic` (generated on the device), so the host needs JAX, Flax, Optax and
Orbax only, plus ml_collections: if it is missing, every wheel in `--wheels` (default: `wheels/` in the
checkout, filled beforehand with `pip download --no-deps ml_collections -d wheels`) goes on sys.path. It prints:
  1. the device kind, the device count, the JAX version;
  2. 3 train steps of the CNN (Fashion-MNIST's shape) and of ResNet-18 (CIFAR-10's) on the accelerator and
     on the host CPU, at float32 with `highest` matmul precision: pass when every step's loss and the
     final parameters agree within TOLERANCE (relative), and the generated batches are bit-identical;
  3. the synthetic generator alone: images/s at 224 px (it runs on the device, ahead of the step);
  4. ResNet-50 v1.5 in bfloat16 at 224 px, batch 256: images/s and MFU, next to the anchor ANCHOR_IMG_S
     (NVIDIA's PyTorch AMP ResNet-50 v1.5, per A100-80GB);
  5. ViT-B/16 in bfloat16 at 224 px, batch 256: images/s and MFU;
  6. the host-overhead row (benchmarks/host_overhead.py): the MLP at batch 8, at steps_per_dispatch 1 and 32.
`--platform=cpu` is the dry run (`--sizes=small` by default there: narrow, shallow models on 32 px images,
a few steps); the tests run it. Exit status 1 when a comparison fails.
Rows 2-5 time the trainer's compiled step, not `trainer.loop.Trainer`: they measure the accelerator; row 6
(host_overhead) runs the full loop.
"""

import argparse
import glob
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-3   # Relative: |loss_acc - loss_cpu| / |loss_cpu| per step, ||p_acc - p_cpu|| / ||p_cpu|| at the end.
ANCHOR_IMG_S = 2470.0  # NVIDIA DeepLearningExamples, ResNet-50 v1.5 PyTorch AMP, DGX A100 (80 GB), per GPU.
COMPARE_STEPS = 3

# Section -> (config overrides, timed steps, warm-up steps) per --sizes.
ROWS = {
    'full': {
        'resnet50': (dict(model='resnet50', stem='imagenet', dataset='imagenet2012', image_size=224, batch_size=256,
                          dtype='bfloat16', optimizer='sgd', momentum=0.9, nesterov=True), 30, 5),
        'vit_b16': (dict(model='vit_b', patch_size=16, dataset='imagenet2012', image_size=224, batch_size=256,
                         dtype='bfloat16', optimizer='adamw', learning_rate=1e-3, weight_decay=1e-4), 30, 5),
    },
    'small': {
        'resnet50': (dict(model='resnet50', stem='imagenet', dataset='imagenet2012', image_size=32, batch_size=8,
                          dtype='bfloat16', resnet_width=8, resnet_stages='1,1,1,1'), 2, 1),
        'vit_b16': (dict(model='vit_b', patch_size=16, dataset='imagenet2012', image_size=32, batch_size=8,
                         dtype='bfloat16', vit_depth=1, optimizer='adamw', learning_rate=1e-3), 2, 1),
    },
}
COMPARE = {
    'full': {'cnn': dict(model='cnn', dataset='fashion_mnist', batch_size=128),
             'resnet18': dict(model='resnet18', stem='small', dataset='cifar10', batch_size=128)},
    'small': {'cnn': dict(model='cnn', dataset='fashion_mnist', batch_size=16),
              'resnet18': dict(model='resnet18', stem='small', dataset='cifar10', batch_size=8, resnet_width=8,
                               resnet_stages='1,1')},
}
HOST_STEPS = {'full': 3000, 'small': 100}
GEN_BATCH = {'full': (256, 224), 'small': (8, 32)}


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m benchmarks.device_check', description=__doc__.split('\n')[0])
  p.add_argument('--platform', default='gpu', choices=('gpu', 'tpu', 'cpu'),
                 help='the accelerator to check against the host CPU (cpu: the dry run)')
  p.add_argument('--sizes', choices=('full', 'small'), help='full (default on gpu/tpu) or small (default on cpu)')
  p.add_argument('--json', help='also write every figure to this file')
  p.add_argument('--wheels', default=os.path.join(ROOT, 'wheels'),
                 help='directory of pure-Python wheels put on sys.path when ml_collections is missing')
  args = p.parse_args(argv)
  args.sizes = args.sizes or ('small' if args.platform == 'cpu' else 'full')
  return args


def _use_wheels(directory: str) -> list:
  """Pure-Python wheels are zip archives Python imports from directly: no pip, no network, nothing installed."""
  import importlib.util
  if importlib.util.find_spec('ml_collections') is not None:
    return []
  wheels = sorted(glob.glob(os.path.join(directory, '*.whl')))
  if not wheels:
    sys.exit(f'error: ml_collections is not installed and {directory} holds no wheels: on a machine with network '
             f'run `pip download --no-deps ml_collections -d {directory}` and bring that folder along')
  sys.path[1:1] = wheels
  return [os.path.basename(w) for w in wheels]


def _say(line: str = '') -> None:
  print(line, flush=True)


def _config(**overrides):
  from benchmarks import kit
  return kit.config(**{**dict(data_source='synthetic', synthetic_train_examples=65536, synthetic_eval_examples=256,
                              eval_batch_size=256, lr_schedule='constant', plot=False, cpu_kernels='off'),
                       **overrides})


def _mesh(devices):
  import jax

  from parallel.mesh import AXIS
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices)


def _steps(config, devices, n):
  """`n` train steps on `devices`: per-step losses, the final params and the first batch's images (host)."""
  import jax
  import numpy as np

  from trainer import job as job_lib
  c = config.copy_and_resolve_references()
  c.num_train_steps = n
  job = job_lib.build(c, mesh=_mesh(devices))
  state = job.stepper.to_device(job.initial_state())
  feed = job.train_feed(0)
  losses, first = [], None
  try:
    for batch in feed:
      if first is None:
        first = np.asarray(jax.device_get(batch['image']))
      state, m = job.stepper.train_step(state, batch)
      m = job.stepper.metrics(m)
      losses.append(float(m['loss_sum']) / float(m['count']))
  finally:
    feed.close()
  return np.array(losses), jax.device_get(job.stepper.to_canonical(state).params), first


def compare(name, config, accel, cpu) -> dict:
  import jax
  import numpy as np
  with jax.default_matmul_precision('highest'):
    a_loss, a_params, a_images = _steps(config, accel, COMPARE_STEPS)
    c_loss, c_params, c_images = _steps(config, cpu, COMPARE_STEPS)
  loss_err = float(np.max(np.abs(a_loss - c_loss) / np.maximum(np.abs(c_loss), 1e-12)))
  diff = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
             for a, b in zip(jax.tree.leaves(a_params), jax.tree.leaves(c_params), strict=True))
  norm = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in jax.tree.leaves(c_params))
  param_err = (diff / max(norm, 1e-30)) ** 0.5
  same_data = bool(np.array_equal(a_images, c_images))
  ok = loss_err <= TOLERANCE and param_err <= TOLERANCE and same_data
  _say(f'  {name:9s} losses {" ".join(f"{v:.5f}" for v in a_loss)}  max rel. loss diff {loss_err:.1e}  '
       f'rel. param diff {param_err:.1e}  same batches {"yes" if same_data else "NO"}  '
       f'{"PASS" if ok else "FAIL"} (tolerance {TOLERANCE:g})')
  return {'losses_accel': a_loss.tolist(), 'losses_cpu': c_loss.tolist(), 'max_rel_loss_diff': loss_err,
          'rel_param_diff': param_err, 'same_batches': same_data, 'pass': ok}


def generator_rate(devices, batch, size, reps=10) -> float:
  """Images/s of the synthetic generator alone (ImageNet's shape at `size` px), on the first of `devices`."""
  import jax
  import jax.numpy as jnp

  from input_pipeline import synthetic
  fn = jax.jit(lambda i: synthetic.examples(0, 'train', i, (size, size, 3), 1000))
  idx = jax.device_put(jnp.arange(batch, dtype=jnp.int32), devices[0])
  jax.block_until_ready(fn(idx))
  t = time.perf_counter()
  for r in range(reps):
    out = fn(idx + r)
  jax.block_until_ready(out)
  return batch * reps / (time.perf_counter() - t)


def throughput(name, config, devices, steps, warm) -> dict:
  """Images/s and MFU of the train step fed by the synthetic generator, in-flight bound as the loop has it."""
  import collections

  import jax

  from trainer import job as job_lib, utilization
  c = config.copy_and_resolve_references()
  c.num_train_steps = steps + warm
  job = job_lib.build(c, mesh=_mesh(devices))
  state = job.stepper.to_device(job.initial_state())
  t0 = time.perf_counter()
  feed = job.train_feed(0)
  pending = collections.deque()
  try:
    for i, batch in enumerate(feed):
      if i == warm:
        jax.block_until_ready(state)
        t, wait = time.perf_counter(), feed.wait_s
        compile_s = t - t0
      state, m = job.stepper.train_step(state, batch)
      pending.append(m)
      while len(pending) > c.max_steps_in_flight:
        job.stepper.metrics(pending.popleft())
    jax.block_until_ready(state)
    dt = time.perf_counter() - t
    wait = feed.wait_s - wait
  finally:
    feed.close()
  img_s = steps * c.batch_size / dt
  flops = utilization.train_step_flops(job, state)  # One device's step.
  peak = utilization.device_peak(job.mesh, c.dtype)
  n = len(devices)
  mfu = flops * (steps / dt) / peak if flops and peak else None
  row = {'images_per_s': img_s, 'images_per_s_per_device': img_s / n, 'ms_per_step': 1e3 * dt / steps,
         'mfu': mfu, 'flops_per_step': flops * n if flops else None, 'peak_flops_per_device': peak,
         'input_wait_share': wait / dt, 'first_steps_s': compile_s, 'batch': c.batch_size,
         'image_size': c.image_size, 'dtype': c.dtype}
  mfu_text = f'{100 * mfu:.1f}%' if mfu is not None else 'n/a (no FLOP count or peak for this device)'
  _say(f'  {name:9s} {img_s:9.1f} img/s ({img_s / n:.1f} per device)  {1e3 * dt / steps:.1f} ms/step  MFU '
       f'{mfu_text}  input wait {100 * wait / dt:.1f}%  compile+warm-up {compile_s:.0f} s')
  return row


def host_overhead(devices, steps) -> dict:
  from benchmarks import host_overhead as ho
  rows = {}
  for k in (1, 32):
    args = ho.parse_args(['--data_source=synthetic', f'--steps_per_dispatch={k}', f'--steps={steps}'])
    r = ho.measure(args, steps, mesh=_mesh(devices[:1]))
    rows[k] = r
    _say(f'  steps_per_dispatch {k:2d}: bare step {r["bare_us"]:.1f} µs, full loop {r["full_us"]:.1f} µs/step '
         f'(+{r["full_us"] - r["bare_us"]:.1f}; input wait {r["input_wait_pct"]:.1f}%)')
  return rows


def main(argv=None) -> int:
  start = time.perf_counter()
  args = parse_args(sys.argv[1:] if argv is None else argv)
  sys.path.insert(0, ROOT)
  wheels = _use_wheels(args.wheels)
  import libenv
  libenv.set_defaults()
  import jax
  if args.platform == 'cpu':
    jax.config.update('jax_platforms', 'cpu')
  from trainer import reporting
  reporting.quiet_library_logs(keep_tracebacks=False)
  from benchmarks.throughput import cpu_model

  accel = jax.devices() if args.platform == 'cpu' else jax.devices(args.platform)
  cpu = jax.devices('cpu')[:1]
  out = {'platform': args.platform, 'sizes': args.sizes, 'device_kind': accel[0].device_kind,
         'devices': len(accel), 'jax': jax.__version__, 'cpu': cpu_model(), 'cores': os.cpu_count(),
         'wheels_on_path': wheels, 'tolerance': TOLERANCE}
  _say(f'Device: {accel[0].device_kind} x {len(accel)} ({args.platform}); JAX {jax.__version__}; host CPU '
       f'{cpu_model()}, {os.cpu_count()} cores; sizes {args.sizes}')

  _say(f'1. {COMPARE_STEPS} train steps, accelerator vs CPU (float32, highest matmul precision):')
  out['compare'] = {name: compare(name, _config(**o), accel[:1], cpu) for name, o in COMPARE[args.sizes].items()}

  batch, size = GEN_BATCH[args.sizes]
  rate = generator_rate(accel, batch, size)
  out['generator_images_per_s'] = rate
  _say(f'2. Synthetic generator alone: {rate:.0f} img/s at {size} px (batch {batch}, on the device)')

  _say('3. Training throughput (synthetic data, all devices):')
  for name, (overrides, steps, warm) in ROWS[args.sizes].items():
    out[name] = throughput(name, _config(**overrides), accel, steps, warm)
  rn50 = out['resnet50']['images_per_s_per_device']
  out['resnet50']['vs_anchor'] = rn50 / ANCHOR_IMG_S
  _say(f'  resnet50 per device = {rn50 / ANCHOR_IMG_S:.2f} x the anchor ({ANCHOR_IMG_S:.0f} img/s: NVIDIA PyTorch AMP '
       'ResNet-50 v1.5 per A100-80GB)' + (' (dry run: small sizes, not comparable)' if args.sizes == 'small' else ''))

  _say(f'4. Host overhead (MLP, batch 8, one device, {HOST_STEPS[args.sizes]} timed steps):')
  out['host_overhead'] = host_overhead(accel, HOST_STEPS[args.sizes])

  out['wall_s'] = time.perf_counter() - start
  passed = all(r['pass'] for r in out['compare'].values())
  _say(f'{"PASS" if passed else "FAIL"}: accelerator vs CPU comparisons; {out["wall_s"]:.0f} s in all')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)
  return 0 if passed else 1


if __name__ == '__main__':
  sys.exit(main())

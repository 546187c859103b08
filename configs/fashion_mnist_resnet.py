"""A narrow CIFAR-style ResNet on Fashion-MNIST, sized for a 2-core CPU (target: >= 94% within an hour).

Run (the Debian `dataset-fashion-mnist` IDX files, as the default job):
  python train.py --config=configs/fashion_mnist_resnet.py --workdir=runs/fmnist_resnet

Model: ResNet v1.5 basic blocks, 3x3 stem without pooling (`stem=small`), three stages of 2 blocks at 16, 32
and 64 channels (28 -> 14 -> 7 px), global average pool: ~0.18 M params, ~113 MFLOP per training image
(forward + backward, XLA's count). Recipe: batch 128 (2 devices x 64, per-device BatchNorm statistics), SGD
Nesterov momentum 0.9, learning rate 0.1, 1 epoch of linear warm-up then cosine to 0 over 20 epochs, weight
decay 5e-4 on kernels, label smoothing 0.1, pad-4 random crop + horizontal flip (`augment='cifar'`); pixels in
[0, 1], no normalisation (the stem's BatchNorm does it). Eval averages the logits of each test image and its
mirror (`eval_flip`; training does not depend on it).

Measured (2-core AMD EPYC VM, 2.45 GHz, AVX2; 2 simulated CPU devices, float32, `cpu_kernels=auto`,
`huge_pages=on`), quiet machine: training took **48 min 26 s** wall clock including start-up, compilation
and 10 evals, at a median 428 img/s. Test accuracy over all 10,000 test examples after 20 epochs: **94.02%**
with `eval_flip` (the final checkpoint evaluated with `--config.eval_only=True`: 17 s; with `eval_flip` on
during the run its 10 evals add ~1 min), **93.83%** with a single view. Single-view accuracy at epochs
2/4/.../20: 81.9 / 86.4 / 87.0 / 90.9 / 91.2 / 92.0 / 92.8 / 93.1 / 93.7 / 93.8%. The 94.0% target is met only
with the flip-averaged eval, and by 0.02 points: a rerun may land on either side of it. Speed:
`bn_mode='local'` (+14% over global statistics here: no all-reduce per BatchNorm layer) and huge pages for the
step's large buffers (+15-18%) take the step from ~330 to ~430 img/s, which is what fits 20 epochs in the hour.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model = 'resnet18'
  c.stem = 'small'
  c.resnet_width = 16
  c.resnet_stages = '2,2,2'
  c.batch_size = 128
  c.bn_mode = 'local'             # per-device statistics (64 images), synced for eval: +14% img/s here
  c.num_epochs = 20
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.lr_schedule = 'warmup_cosine'
  c.warmup_steps = 60_000 // c.batch_size
  c.label_smoothing = 0.1
  c.eval_every_steps = 2 * (60_000 // c.batch_size)
  c.log_every_steps = 100
  c.augment = 'cifar'             # pad 4, random crop, horizontal flip
  c.eval_flip = True              # eval: mean logits of the image and its mirror
  c.huge_pages = 'on'             # the step's >32 MiB buffers on huge pages: +15-18% img/s on this CPU
  return c

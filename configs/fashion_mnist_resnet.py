"""A narrow CIFAR-style ResNet on Fashion-MNIST, sized for a 2-core CPU (target: >= 94% within an hour).

Run (the Debian `dataset-fashion-mnist` IDX files, as the default job):
  python train.py --config=configs/fashion_mnist_resnet.py --workdir=runs/fmnist_resnet

Model: ResNet v1.5 basic blocks, 3x3 stem without pooling (`stem=small`), three stages of 2 blocks at 16, 32
and 64 channels (28 -> 14 -> 7 px), global average pool: ~0.18 M params, ~113 MFLOP per training image
(forward + backward, XLA's count). Recipe: batch 128, SGD Nesterov momentum 0.9, learning rate 0.1, 1 epoch
of linear warm-up then cosine to 0 over 14 epochs, weight decay 5e-4 on kernels, label smoothing 0.1, pad-4
random crop + horizontal flip (`augment='cifar'`); pixels in [0, 1], no normalisation (the stem's BatchNorm
does it).

Measured (2-core AMD EPYC VM, 2.45 GHz, AVX2; 2 simulated CPU devices, float32, `conv_impl=auto`, i.e. the
matmul kernel gradient of models/conv.py), the whole command above, quiet machine: **93.40%** test accuracy
(all 10,000 test examples) after 14 epochs, **48 min 45 s** wall clock including start-up, compilation and 7
evals; 290-345 img/s. Eval accuracy by epoch: 2: 83.5%, 4: 89.0%, 6: 89.0%, 8: 91.4%, 10: 92.7%, 12: 93.3%,
14: 93.4%. The issue's target (>= 94.0% within 60 minutes on this VM) is NOT met: more epochs do not fit the
hour at this speed, and a wider or deeper net is slower still (width 24 or 32, or 4 stages, measured 190-260
img/s). Earlier: 24 epochs at XLA's own kernel gradients would have taken ~85 minutes.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model = 'resnet18'
  c.stem = 'small'
  c.resnet_width = 16
  c.resnet_stages = '2,2,2'
  c.batch_size = 128
  c.num_epochs = 14
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
  return c

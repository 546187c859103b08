"""A narrow CIFAR-style ResNet on Fashion-MNIST, sized for a 2-core CPU: the >= 94% recipe.

Run (the Debian `dataset-fashion-mnist` IDX files, as the default job):
  python train.py --config=configs/fashion_mnist_resnet.py --workdir=runs/fmnist_resnet

Model: ResNet v1.5 basic blocks, 3x3 stem without pooling (`stem=small`), three stages of 2 blocks at 16, 32
and 64 channels (28 -> 14 -> 7 px), global average pool: ~0.18 M params, ~113 MFLOP per training image
(forward + backward, XLA's count). Recipe: batch 128, SGD Nesterov momentum 0.9, learning rate 0.1, 2 epochs
of linear warm-up then cosine to 0, weight decay 5e-4 on kernels, label smoothing 0.1, pad-4 random crop +
horizontal flip (`augment='cifar'`); pixels in [0, 1], no normalisation (the stem's BatchNorm does it).

Expected, to be measured: >= 94.0% test accuracy in about 42 minutes of wall time (24 epochs, 11,232 steps)
on the 2-core development VM (2 simulated CPU devices, float32); 60 minutes is the limit. Estimated from
short timed runs (100-step rounds interleaved with the default CNN on the same, loaded, machine): a step
costs 5.0-5.7x a default-CNN step (4.2x its FLOPs), i.e. ~215 ms against the CNN's quiet 39.4 ms, ~100 s
per epoch (85-120 s); the crop + flip cost ~19 ms of host CPU per batch (11,000 img/s alone), included.
Evaluations every 2 epochs add ~1 minute in all. The full run has not been made yet.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model = 'resnet18'
  c.stem = 'small'
  c.resnet_width = 16
  c.resnet_stages = '2,2,2'
  c.batch_size = 128
  c.num_epochs = 24
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.lr_schedule = 'warmup_cosine'
  c.warmup_steps = 2 * (60_000 // c.batch_size)
  c.label_smoothing = 0.1
  c.eval_every_steps = 2 * (60_000 // c.batch_size)
  c.log_every_steps = 100
  c.augment = 'cifar'             # pad 4, random crop, horizontal flip
  return c

"""ResNet-18 (small-image stem) on CIFAR-10: the common 200-epoch SGD recipe.

Run (CIFAR-10 from TFDS; `--config.download=True` the first time, on a machine with internet):
  python train.py --config=configs/cifar10_resnet18.py --workdir=runs/cifar10 --config.download=True

Recipe (as kuangliu/pytorch-cifar): batch 128, SGD momentum 0.9, learning rate 0.1, cosine to 0 over
200 epochs, weight decay 5e-4 (kernels only), pad-4 random crop + horizontal flip, 3x3 stem without
max-pool (`stem=small`, also what `auto` picks at 32 px).

Expected (published, not measured here): 93-95% test accuracy (kuangliu/pytorch-cifar reports 95.4%
for ResNet-18). ~0.56 GFLOP per image forward; meant for a GPU or TPU, with `--config.dtype=bfloat16` there.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = 'cifar10'
  c.data_source = 'tfds'
  c.model = 'resnet18'
  c.stem = 'small'
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 200
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.lr_schedule = 'cosine'
  c.checkpoint_every_steps = 2000
  c.augment = 'cifar'             # pad 4, random crop, horizontal flip
  c.normalize = True
  c.mean = (0.4914, 0.4822, 0.4465)  # CIFAR-10's per-channel statistics
  c.std = (0.2470, 0.2435, 0.2616)
  return c

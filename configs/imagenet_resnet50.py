"""ResNet-50 v1.5 on ImageNet: the Flax ImageNet example's recipe, for a TPU VM or a GPU node.

Run (ImageNet prepared for TFDS as `imagenet2012` in DATA_DIR; e.g. on a TPU v3-8 or 8 GPUs):
  python train.py --config=configs/imagenet_resnet50.py --config.data_dir=DATA_DIR --workdir=runs/imagenet

Recipe (Flax `examples/imagenet`, configs/tpu.py): global batch 1024, SGD with Nesterov momentum 0.9,
learning rate 0.1 per 256 images (0.4 at 1024), 5 epochs of linear warm-up then cosine to 0, 100 epochs,
weight decay 1e-4 on kernels only, bfloat16 compute with float32 params, BatchNorm statistics over the
global batch, random-resized-crop + flip at 224 px.

Expected (published, not measured here): 76.37% top-1 in 4.4 h on a TPU v3-8, 76.54% in 2.1 h on a v3-32
(Flax `examples/imagenet/README.md`). Not run on the development machine (a 2-core CPU VM; one epoch
there would take days). Reads TFDS by random access (decode, random-resized crop
and flip at 224 px on host threads), evaluates on the `validation` split.
"""

from configs import default

TRAIN_IMAGES = 1_281_167


def get_config():
  c = default.get_config()
  c.dataset = 'imagenet2012'
  c.data_source = 'tfds'
  c.model = 'resnet50'
  c.stem = 'imagenet'
  c.dtype = 'bfloat16'
  c.batch_size = 1024
  c.eval_batch_size = 1000
  c.num_epochs = 100
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.lr_per_256 = True
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 1e-4
  c.lr_schedule = 'warmup_cosine'
  c.warmup_steps = 5 * (TRAIN_IMAGES // c.batch_size)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.plot = False
  c.eval_split = 'validation'     # imagenet2012's test split has no labels
  c.image_size = 224
  c.augment = 'imagenet'          # random-resized crop + flip; eval resize + centre crop
  c.normalize = True              # ImageNet mean/std (the defaults)
  return c

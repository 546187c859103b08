"""A seconds-long job for tests and smoke checks: the MLP on a small fake or real IDX dataset.

  python train.py --config=configs/tiny.py --config.data_dir=DIR --workdir=/tmp/tiny
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model = 'mlp'
  c.batch_size = 64
  c.eval_batch_size = 48
  c.num_epochs = 2
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.log_every_steps = 4
  c.checkpoint_every_steps = 4
  c.plot = False
  return c

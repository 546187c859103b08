"""A config outside the checkout: the project's defaults, with a model, an augmentation and a hook of your own.

  python /path/to/dptrain/train.py --config=my_config.py --workdir=/tmp/mine [--config.model_kwargs.width=32]

Modules beside this file (my_model.py, my_augment.py, my_hooks.py) are importable by their names.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model = 'my_model:SmallNet'
  c.model_kwargs.width = 16
  c.augment = 'my_augment:Brightness'
  c.hooks = 'my_hooks:weight_norm@4'
  c.batch_size = 64
  c.eval_batch_size = 48
  c.num_epochs = 1
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.log_every_steps = 4
  c.checkpoint_every_steps = 4
  c.plot = False
  return c

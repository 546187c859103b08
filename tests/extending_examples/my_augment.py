"""An augmentation of your own, named by `config.augment = 'my_augment:Brightness'`."""

import tensorflow as tf

from input_pipeline import augment


class Brightness(augment.NoAugment):
  """Decode and resize (NoAugment), then shift the brightness by up to +-20 of 255 in training.

  The shift is drawn from `key` (seed, step and the example's global index), so every topology and a
  resumed run see the same pixels.
  """

  def train(self, raw, key, size, channels):
    image = super().train(raw, key, size, channels)  # float32 in [0, 255]
    return tf.clip_by_value(image + tf.random.stateless_uniform([], key, -20.0, 20.0), 0.0, 255.0)

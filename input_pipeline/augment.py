"""Per-example decoding, augmentation and scaling, as TF ops run on tf.data's host threads.

An example arrives from a source as uint8 [H, W, C] or as encoded image bytes (JPEG/PNG), and leaves as
float32 [S, S, C] in [0, 1] (or mean/std normalised). Every random choice comes from stateless ops keyed by
(seed, step, global example index), never from a per-process RNG: any topology and a resumed run see the
same pixels.

`AUGMENTATIONS` is the registry `config.augment` is checked against:
  - `none`:     decode, resize to `image_size` if set, scale. The seed's job is unchanged.
  - `cifar`:    + zero-pad 4, random crop back to size, horizontal flip (train only).
  - `imagenet`: random-resized crop (area 8-100%, aspect 3/4-4/3) read by a fused decode-and-crop for JPEG,
                resize, flip; eval resizes the shorter side to size / 0.875 and centre-crops.
A `MODULE:ATTR` value names one outside the project: a class (or a function of no arguments returning an
object) with the built-ins' `train(raw, key, size, channels)` and `eval(raw, size, channels)` methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import plugins
from errors import UserError, first_line, setting
from input_pipeline.tf_host import tf  # Lazy: the registry and `Preprocess`'s shapes need no TensorFlow.

_CROP_PADDING = 0.875  # Eval: centre crop of 87.5%, as the ResNet/Inception recipes do.


def decode(raw: tf.Tensor, channels: int) -> tf.Tensor:
  """uint8 [H, W, channels] from encoded bytes (JPEG, PNG; converted to `channels`), or `raw` itself."""
  if raw.dtype != tf.string:
    return raw
  image = tf.io.decode_image(raw, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def _resize(image: tf.Tensor, size: tuple[int, int] | None) -> tf.Tensor:
  """float32 in [0, 255]: resized (bilinear) to `size`, or only cast when `size` is None."""
  return tf.cast(image, tf.float32) if size is None else tf.image.resize(image, size)


def _flip(image, key):
  return tf.image.stateless_random_flip_left_right(image, key)


class NoAugment:
  """Decode and resize only; train and eval alike."""

  def train(self, raw, key, size, channels):
    del key
    return _resize(decode(raw, channels), size)

  def eval(self, raw, size, channels):
    return _resize(decode(raw, channels), size)


class CifarAugment(NoAugment):
  """Zero-pad 4 pixels, random crop back to size, random horizontal flip."""

  def train(self, raw, key, size, channels):
    image = super().train(raw, None, size, channels)
    keys = tf.random.experimental.stateless_split(key, 2)
    shape = tf.shape(image)
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
    image = tf.image.stateless_random_crop(padded, shape, keys[0])
    return _flip(image, keys[1])


class ImagenetAugment:
  """Random-resized crop + flip for training; resize + centre crop for eval."""

  def _window(self, shape, key):
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=key,
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, crop

  def _crop(self, image, key):
    begin, crop = self._window(tf.shape(image), key)
    return tf.slice(image, begin, crop)

  def train(self, raw, key, size, channels):
    keys = tf.random.experimental.stateless_split(key, 2)
    if raw.dtype == tf.string:
      def fused():  # Decodes only the crop window of a JPEG.
        begin, crop = self._window(tf.image.extract_jpeg_shape(raw), keys[0])
        return tf.image.decode_and_crop_jpeg(raw, tf.stack([begin[0], begin[1], crop[0], crop[1]]),
                                             channels=channels)
      image = tf.cond(tf.io.is_jpeg(raw), fused, lambda: self._crop(decode(raw, channels), keys[0]))
      image.set_shape([None, None, channels])
    else:
      image = self._crop(raw, keys[0])
    return _flip(tf.image.resize(image, size), keys[1])

  def eval(self, raw, size, channels):
    image = decode(raw, channels)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.reduce_max(tf.constant(size, tf.float32) / shape) / _CROP_PADDING
    resized = tf.image.resize(image, tf.cast(tf.math.ceil(shape * scale), tf.int32))
    return tf.image.resize_with_crop_or_pad(resized, size[0], size[1])


AUGMENTATIONS = {'none': NoAugment, 'cifar': CifarAugment, 'imagenet': ImagenetAugment}


def create(name: str):
  """The augmentation `name` (an `AUGMENTATIONS` key, or `MODULE:ATTR`) names, ready to use."""
  if not plugins.is_path(name):
    return AUGMENTATIONS[name]()
  target = plugins.resolve(name, 'augment')
  try:
    aug = target() if callable(target) else None
  except Exception as e:
    raise UserError(f'{setting("augment")}={name!r} failed to build ({e.__class__.__name__}: {first_line(e)}): it '
                    'must be a class or a function of no arguments') from None
  for method, args in (('train', ('raw', 'key', 'size', 'channels')), ('eval', ('raw', 'size', 'channels'))):
    fn = getattr(aug, method, None)
    names, var = plugins.keywords(fn) if callable(fn) else ((), False)
    if not callable(fn) or (len(names) != len(args) and not var):
      raise UserError(f'{setting("augment")}={name!r} gives no {method}({", ".join(args)}) method: name a class '
                      'like input_pipeline.augment.NoAugment (subclass it to keep its decode and resize)')
  return aug


def example_key(seed, step, index) -> tf.Tensor:
  """The stateless RNG key of one example at one step: depends on nothing else (no topology, no history)."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


class Preprocess:
  """One config's preprocessing: augmentation, output size, channels and normalisation."""

  def __init__(self, augment: str = 'none', image_size: int = 0, *, channels: int,
               native_shape: Sequence[int] | None, normalize: bool = False, mean=(), std=()):
    self.name = augment
    self._aug = create(augment)
    self.channels = channels
    if image_size:
      self.size = (image_size, image_size)
    elif native_shape is None:
      raise UserError(f'the images of this dataset differ in size: set {setting("image_size")} (e.g. 224, or 64 '
                      'for a quick run) to resize them to one size')
    else:
      self.size = tuple(native_shape[:2])
    self._resize = None if not image_size and augment != 'imagenet' else self.size
    self.normalize = normalize
    if normalize:
      if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise UserError(f'{setting("mean")} and {setting("std")} need 1 or {channels} values for images with '
                        f'{channels} channel(s); got {len(mean)} and {len(std)}')
      self._mean = np.asarray(mean, np.float32) * 255.0
      self._scale = 1.0 / (np.asarray(std, np.float32) * 255.0)

  @classmethod
  def from_config(cls, config, source) -> Preprocess:
    return cls(config.augment, config.image_size, channels=source.channels, native_shape=source.image_shape,
               normalize=config.normalize, mean=tuple(config.mean), std=tuple(config.std))

  @property
  def per_pixel_only(self) -> bool:
    """No decoding, resizing or randomness: the same ops apply to a whole batch of arrays at once."""
    return self.name == 'none' and self._resize is None

  @property
  def output_shape(self) -> tuple[int, int, int]:
    return self.size + (self.channels,)

  def describe(self) -> str:
    norm = ', mean/std normalised' if self.normalize else ''
    return f'augment {self.name}, images {"x".join(map(str, self.output_shape))}{norm}'

  def _finish(self, image):
    if self.normalize:
      return (image - self._mean) * self._scale
    return image * (1.0 / 255.0)

  def train(self, raw, key) -> tf.Tensor:
    return self._finish(self._aug.train(raw, key, self._resize, self.channels))

  def eval(self, raw) -> tf.Tensor:
    return self._finish(self._aug.eval(raw, self._resize, self.channels))

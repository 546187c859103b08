"""Small image folders for the tests and benchmarks: `root/{train,test}/<class>/*.{png,jpg}`, learnable."""

import os

import numpy as np


def encode(image: np.ndarray, fmt: str) -> bytes:
  import tensorflow as tf
  if fmt == 'png':
    return tf.io.encode_png(image).numpy()
  return tf.io.encode_jpeg(image, quality=90).numpy()


def write_image(path: str, image: np.ndarray) -> str:
  with open(path, 'wb') as f:
    f.write(encode(image, 'png' if path.endswith('.png') else 'jpg'))
  return path


def make_image_folder(root: str, *, num_classes: int = 3, per_class=(8, 4), size=(12, 12), channels: int = 3,
                      fmt: str = 'png', eval_dir: str = 'test', seed: int = 0) -> str:
  """Class k is a bright horizontal band at row band k over noise, so a model can learn it."""
  rng = np.random.default_rng(seed)
  h, w = size
  for split, n in zip(('train', eval_dir), per_class, strict=True):
    for k in range(num_classes):
      d = os.path.join(root, split, f'class_{k:02d}')
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        image = rng.integers(0, 60, (h, w, channels)).astype(np.uint8)
        band = slice(k * h // num_classes, (k + 1) * h // num_classes)
        image[band] += 150
        write_image(os.path.join(d, f'{i:05d}.{fmt}'), image)
  return root

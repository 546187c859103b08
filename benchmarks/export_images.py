"""Writes image folders for the folder-source measurements (README "Data sources").

  python -m benchmarks.export_images fashion_mnist DIR      # the IDX files as DIR/{train,test}/<class>/*.png
  python -m benchmarks.export_images jpegs DIR --count=20000 --size=256x256 [--eval_count=200]

Writes data, times nothing (so no `trainer.loop.Trainer`).
`jpegs` writes random smooth-noise RGB JPEGs (quality 90) over 10 classes, sizes HxW.
"""

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_integer('count', 2000, 'jpegs: train images.')
flags.DEFINE_integer('eval_count', 200, 'jpegs: test images.')
flags.DEFINE_string('size', '256x256', 'jpegs: HxW.')
FLAGS = flags.FLAGS


def _write(path, image, fmt):
  from tests.image_folders import encode
  with open(path, 'wb') as f:
    f.write(encode(image, fmt))


def fashion_mnist(root):
  from input_pipeline import sources
  data = sources.load_idx('fashion_mnist', '')
  for split, images, labels in (('train', data.train_images, data.train_labels),
                                ('test', data.test_images, data.test_labels)):
    for k in range(10):
      os.makedirs(os.path.join(root, split, str(k)), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      _write(os.path.join(root, split, str(label), f'{i:05d}.png'), image, 'png')


def jpegs(root):
  h, w = map(int, FLAGS.size.split('x'))
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (64, h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
  for split, n in (('train', FLAGS.count), ('test', FLAGS.eval_count)):
    for i in range(n):
      d = os.path.join(root, split, f'c{i % 10}')
      os.makedirs(d, exist_ok=True)
      image = np.kron(base[i % 64], np.ones((8, 8, 1), np.uint8))[:h, :w]
      image = (image + rng.integers(0, 40, image.shape, dtype=np.uint8))
      _write(os.path.join(d, f'{i:06d}.jpg'), image, 'jpg')


def main(argv):
  what, root = argv[1], argv[2]
  {'fashion_mnist': fashion_mnist, 'jpegs': jpegs}[what](root)
  print(f'wrote {root}')


if __name__ == '__main__':
  app.run(main)

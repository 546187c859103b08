"""Augmentation: a pure function of (seed, step, global example index), so any topology and a resumed run
see the same pixels; and each augmentation does what it says."""

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import kit
from configs import tiny
from errors import UserError
from input_pipeline import augment, order, pipeline, sources
from parallel import mesh as mesh_lib
from tests.image_folders import encode
from trainer import job as job_lib

N, B, SIZE = 40, 8, 12          # 5 steps per epoch
STEPS = 12                      # into a third epoch


@pytest.fixture(scope='module')
def jpeg_source():
  """An in-memory source whose examples are JPEG bytes of differing sizes (like a folder of photos)."""
  rng = np.random.default_rng(0)

  class Jpegs(sources.Source):
    description, num_classes, image_shape, channels = 'jpegs', 4, None, 3

    def __init__(self):
      self.data = [encode(rng.integers(0, 256, (16 + i % 5, 20 - i % 3, 3)).astype(np.uint8), 'jpg')
                   for i in range(N)]

    def num_examples(self, split):
      return N

    def reader(self, split):
      data, labels = tf.constant(self.data), tf.constant(np.arange(N, dtype=np.int32) % 4)
      return lambda i: (tf.gather(data, i), tf.gather(labels, i))
  return Jpegs()


def _prep(source, name, size=SIZE, **kw):
  return augment.Preprocess(name, size, channels=source.channels, native_shape=source.image_shape, **kw)


def _stream(source, prep, rows=(0, B), start_step=0, num_steps=STEPS, seed=0):
  return list(pipeline.as_numpy(pipeline.train_dataset(source, prep, seed=seed, global_batch=B, rows=rows,
                                                       start_step=start_step, num_steps=num_steps)))


@pytest.fixture(scope='module', params=['cifar', 'imagenet'])
def stream(request, jpeg_source):
  prep = _prep(jpeg_source, request.param)
  return prep, _stream(jpeg_source, prep)


def test_augmented_stream_same_for_simulated_processes(jpeg_source, stream):
  prep, full = stream
  for parts in (2, 4):
    rows = [(p * B // parts, (p + 1) * B // parts) for p in range(parts)]
    streams = [_stream(jpeg_source, prep, rows=r) for r in rows]
    for s, ref in enumerate(full):
      np.testing.assert_array_equal(np.concatenate([st[s]['image'] for st in streams]), ref['image'])
      np.testing.assert_array_equal(np.concatenate([st[s]['label'] for st in streams]), ref['label'])


@pytest.mark.parametrize('start_step', [3, 5, 7])  # mid-epoch, epoch boundary, mid second epoch
def test_augmented_resume_continues_the_same_stream(jpeg_source, stream, start_step):
  prep, full = stream
  resumed = _stream(jpeg_source, prep, start_step=start_step)
  assert len(resumed) == STEPS - start_step
  for got, ref in zip(resumed, full[start_step:], strict=True):
    np.testing.assert_array_equal(got['image'], ref['image'])


def test_augmentation_is_random_but_seeded(jpeg_source, stream):
  prep, full = stream
  assert full[0]['image'].shape == (B, SIZE, SIZE, 3) and full[0]['image'].dtype == np.float32
  assert 0 <= min(b['image'].min() for b in full) and max(b['image'].max() for b in full) <= 1
  # The same example in two epochs gets different pixels (the step is in the key).
  spe = N // B
  first = {int(i): full[s]['image'][p] for s in range(spe) for p, i in enumerate(order.epoch_batches(0, 0, N, B)[s])}
  second = {int(i): full[spe + s]['image'][p] for s in range(spe)
            for p, i in enumerate(order.epoch_batches(0, 1, N, B)[s])}
  common = sorted(set(first) & set(second))
  assert len(common) == N and sum(not np.array_equal(first[i], second[i]) for i in common) > N // 2
  # ... and another seed gives other pixels; the same seed the same.
  other = _stream(jpeg_source, prep, num_steps=2, seed=1)
  again = _stream(jpeg_source, prep, num_steps=2, seed=0)
  np.testing.assert_array_equal(again[1]['image'], full[1]['image'])
  assert not np.array_equal(other[0]['image'], full[0]['image'])


def test_one_vs_eight_devices_identical_batches(jpeg_source):
  """The placed global batches of the real job's feed: 1 device == 8 devices, augmentation on."""
  def feed(num_devices):
    c = tiny.get_config()
    c.update(batch_size=B, eval_batch_size=B, augment='imagenet', image_size=SIZE, num_train_steps=4)
    job = job_lib.build(c, mesh=mesh_lib.make_mesh(num_devices), data=jpeg_source)
    f = job.train_feed(0)
    try:
      return [{k: np.asarray(v) for k, v in b.items()} for b in f]
    finally:
      f.close()
  one, eight = feed(1), feed(8)
  assert len(one) == len(eight) == 4
  for a, b in zip(one, eight, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_none_is_the_plain_scaling():
  images = np.random.default_rng(1).integers(0, 256, (N, 5, 5, 1)).astype(np.uint8)
  src = kit.dataset(images=images, labels=np.arange(N, dtype=np.int32), test=N, classes=N, source='t')
  for b in _stream(src, _prep(src, 'none', size=0), num_steps=3):
    np.testing.assert_array_equal(b['image'], images[b['label']].astype(np.float32) * np.float32(1 / 255))


def test_cifar_is_a_shifted_flipped_copy():
  """Every cifar-augmented image is the original shifted by <= 4 pixels (zeros shifted in), maybe mirrored."""
  images = np.random.default_rng(2).integers(1, 256, (N, 8, 8, 1)).astype(np.uint8)
  src = kit.dataset(images=images, labels=np.arange(N, dtype=np.int32), test=N, classes=N, source='t')
  flips = shifts = 0
  for b in _stream(src, _prep(src, 'cifar', size=0), num_steps=5):
    for image, i in zip(b['image'], b['label'], strict=True):
      padded = np.pad(images[i].astype(np.float32) / 255, ((4, 4), (4, 4), (0, 0)))
      match = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
               if np.allclose((padded[:, ::-1] if f else padded)[dy:dy + 8, dx:dx + 8], image, atol=1e-6)]
      assert match, f'example {i} is not a crop of its padded original'
      flips += match[0][2]
      shifts += (match[0][0], match[0][1]) != (4, 4)
  assert flips and shifts


def test_imagenet_fused_jpeg_crop_equals_decode_then_crop(jpeg_source):
  prep = _prep(jpeg_source, 'imagenet')
  raw = jpeg_source.reader('train')(tf.constant(3, tf.int64))[0]
  key = augment.example_key(0, 5, 3)
  fused = prep.train(raw, key).numpy()
  decoded = prep.train(augment.decode(raw, 3), key).numpy()
  np.testing.assert_allclose(fused, decoded, atol=2 / 255)


def test_imagenet_eval_is_a_centre_crop():
  image = np.zeros((40, 80, 1), np.uint8)
  image[:, 30:50] = 255  # a bright centre column band, 20 of 80 wide
  out = augment.ImagenetAugment().eval(tf.constant(image), (16, 16), 1).numpy()
  assert out.shape == (16, 16, 1)
  # Shorter side 40 -> 16/0.875 = 18.3 (scale 0.457): the band is ~9 px wide, centred.
  row = out[8, :, 0]
  assert row[8] == pytest.approx(255, abs=1) and row[0] == pytest.approx(0, abs=1) and row[15] < 10


def test_normalisation():
  images = np.full((N, 4, 4, 3), 255, np.uint8)
  src = kit.dataset(images=images, labels=np.arange(N, dtype=np.int32) % 2, test=(images, np.zeros(N, np.int32)),
                    classes=2, source='t')
  prep = _prep(src, 'none', size=0, normalize=True, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
  out = _stream(src, prep, num_steps=1)[0]['image']
  np.testing.assert_allclose(out[0, 0, 0], [1.0, 3.0, 0.5], rtol=1e-6)
  with pytest.raises(UserError, match='mean'):
    _prep(src, 'none', size=0, normalize=True, mean=(0.5, 0.5), std=(1.0,))


def test_mixed_sizes_need_image_size(jpeg_source):
  with pytest.raises(UserError, match='image_size'):
    _prep(jpeg_source, 'none', size=0)

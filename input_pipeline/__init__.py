"""Everything between files on disk and batches laid out on the devices.

- `idx`: reads and validates MNIST-format IDX files.
- `sources`: dataset registry; loads a dataset into memory from IDX files or TFDS.
- `order`: which examples form global batch `step` (depends only on seed and global batch size).
- `pipeline`: tf.data streams of this process's slice of each train/eval batch.
- `device_feed`: puts host batches on the devices (shard_map or pmap layout) and prefetches.
"""

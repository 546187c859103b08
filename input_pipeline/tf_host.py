"""TensorFlow as a host-only data library: imported on first use, never on the compute path.

tf.data sources (idx, tfds, folder) need TensorFlow; the models, the step, the optimizer, checkpoints and
`data_source=synthetic` do not, so a host without TensorFlow (a lean GPU image) still trains. Every module
of ours reaches TensorFlow through `module()` (or the lazy `tf` below), so whichever loads it first also
hides the accelerators from it: TensorFlow must never grab a GPU's or TPU's memory.
"""

import importlib.util

from errors import UserError, setting

_TF = None


def available() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def module():
  """The `tensorflow` module, configured once: no GPU or TPU visible to it."""
  global _TF
  if _TF is None:
    if not available():
      raise UserError(f'{setting("data_source")}=idx, tfds and folder read data with tf.data, and TensorFlow is not '
                      f'installed here: `pip install tensorflow`, or use {setting("data_source")}=synthetic')
    import tensorflow as tf
    tf.config.set_visible_devices([], 'GPU')
    if tf.config.list_physical_devices('TPU'):
      tf.config.set_visible_devices([], 'TPU')
    _TF = tf
  return _TF


class _Lazy:
  """`tf.NAME` resolves `module().NAME` at first use, so a module can name `tf` at top level for free."""

  def __getattr__(self, name):
    return getattr(module(), name)


tf = _Lazy()

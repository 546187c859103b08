"""CPU speed-ups for plain Flax models, applied from outside them: `plug(model, config.cpu_kernels)`.

The models (models/) are plain `flax.linen`; on XLA's CPU backend three of their pieces run faster written by
hand, with the same math and the same variables:
  - `nn.Conv`: the kernel gradient as a chunked im2col matmul (conv.py);
  - `nn.BatchNorm` in training: a hand-written backward pass with fewer memory passes (norm.py);
  - an `nn.Conv` whose output goes straight into an `nn.BatchNorm`: its bias, which the normalisation cancels,
    is handed to the BatchNorm's statistics instead of being added in a pass of its own.
`plug` wraps a model so that its `init` and `apply` run under an `nn.intercept_methods` interceptor that does
this; anything else (other modules, unusual Conv or BatchNorm settings, eval-mode BatchNorm) runs flax's own
code. malloc.py holds the host memory tuning that `train.py` and parallel/topology.py apply.

Only the CPU is known to gain (cuDNN and the TPU compiler fuse BatchNorm and have fast kernel gradients), so
`cpu_kernels='auto'` plugs them in on the CPU platform only; `'off'` runs the models exactly as written.
"""

import contextlib

import flax.linen as nn
import jax

from cpu_kernels import conv, norm

SETTINGS = ('auto', 'off')  # config.cpu_kernels


def enabled(setting: str, platform: str | None = None) -> bool:
  """'auto' -> on where the platform (default: JAX's default backend) is the CPU; 'off' -> never."""
  return setting == 'auto' and (platform or jax.default_backend()) == 'cpu'


@contextlib.contextmanager
def intercepted():
  """Within it, plain `nn.Conv` and `nn.BatchNorm` calls traced by flax run the CPU kernels."""
  handoff = conv.Handoff()  # Conv outputs whose bias a following BatchNorm may take over, for this trace only.

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and type(context.module) is nn.Conv:
      return conv.intercept_conv(next_fun, args, kwargs, context.module, handoff)
    if context.method_name == '__call__' and type(context.module) is nn.BatchNorm:
      return norm.intercept_batch_norm(next_fun, args, kwargs, context.module, handoff)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


class Plugged:
  """`model` (a flax Module) whose `init` and `apply` run `intercepted()`; every other attribute is the
  model's. Variables are the model's own, so checkpoints move freely between `cpu_kernels` settings."""

  def __init__(self, model: nn.Module):
    self.model = model

  def init(self, *args, **kwargs):
    with intercepted():
      return self.model.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with intercepted():
      return self.model.apply(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.model, name)

  def __repr__(self):
    return f'Plugged({self.model!r})'


def plug(model: nn.Module, setting: str, platform: str | None = None):
  """`model` with the CPU kernels where `enabled(setting, platform)`, else `model` itself."""
  return Plugged(model) if enabled(setting, platform) else model

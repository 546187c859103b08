"""Vision Transformer (pre-LayerNorm encoder, learned position embeddings, global-average-pooled head).

`patch_size` is a config field: 16 at 224 px (ViT-Ti/S/B/L/16), 4 at 32 px or 28 px. No BatchNorm, so the
model is also the test case for exact gradient accumulation.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# name -> (width, depth, heads, mlp width)
SIZES = {
    'vit_ti': (192, 12, 3, 768),
    'vit_s': (384, 12, 6, 1536),
    'vit_b': (768, 12, 12, 3072),
    'vit_l': (1024, 24, 16, 4096),
}


class EncoderBlock(nn.Module):
  heads: int
  mlp_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    dense = lambda f, **kw: nn.Dense(f, dtype=self.dtype, param_dtype=jnp.float32,
                                     kernel_init=nn.initializers.xavier_uniform(), **kw)
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype, param_dtype=jnp.float32,
                                        kernel_init=nn.initializers.xavier_uniform())(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = dense(x.shape[-1])(nn.gelu(dense(self.mlp_dim)(y)))
    return x + y


class ViT(nn.Module):
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch_size: int = 16
  num_classes: int = 10
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # Unused (no BatchNorm); accepted like every registry model.

  @nn.compact
  def __call__(self, x, train: bool = True):
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f'patch size {p} does not divide the {x.shape[1]}x{x.shape[2]} images')
    x = nn.Conv(self.width, (p, p), (p, p), padding='VALID', dtype=self.dtype, param_dtype=jnp.float32,
                name='patch_embed')(x.astype(self.dtype))
    x = x.reshape((x.shape[0], -1, self.width))
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, x.shape[1], self.width), jnp.float32)
    x = x + pos.astype(self.dtype)
    for _ in range(self.depth):
      x = EncoderBlock(self.heads, self.mlp_dim, self.dtype)(x)
    x = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x).mean(axis=1)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.zeros,
                 name='head')(x)
    return x.astype(jnp.float32)


def build(name: str, config, **kw) -> ViT:
  """Reads `config.patch_size` and `config.vit_depth` (0 = the model's standard depth: 12, vit_l 24)."""
  width, depth, heads, mlp_dim = SIZES[name]
  return ViT(width, config.vit_depth or depth, heads, mlp_dim, patch_size=config.patch_size, **kw)

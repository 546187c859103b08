"""The train state: what a checkpoint holds, and its initial (canonical, replicated) value."""

from typing import Any

import flax
import jax
import jax.numpy as jnp

from parallel.mesh import replicated


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the data position follows from `step`."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def initial_state(mesh, model, tx, image_shape, seed: int) -> TrainState:
  """Same params for any topology: initialised once from `seed`, replicated over the mesh."""

  def init():
    key = jax.random.PRNGKey(seed)
    init_key, state_key = jax.random.split(key)
    variables = model.init({'params': init_key}, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params), rng=state_key)

  return jax.jit(init, out_shardings=replicated(mesh))()

"""The train state pytree and its sharded, abstract and concrete construction."""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxret.parallel import partitioning
from jaxret.parallel.mesh import batch_parallelism


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def dummy_inputs(model, image_size, batch):
  return (jnp.zeros((batch, image_size, image_size, 3), jnp.float32),
          jnp.zeros((batch, model.text.max_len), jnp.int32))


def state_shardings(model, tx, mesh, image_size):
  """-> (abstract TrainState of ShapeDtypeStructs carrying shardings, sharding tree), no allocation."""
  n = batch_parallelism(mesh)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model, image_size, n)))
  param_sh = partitioning.logical_shardings(boxed, mesh)["params"]
  abstract_params = nn.unbox(boxed)["params"]
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Optimizer moments shard like their parameters; counters and the like are replicated.
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_sh,
      transform_non_params=lambda _: partitioning.replicated(mesh))
  shardings = TrainState(step=partitioning.replicated(mesh), params=param_sh, opt_state=opt_sh)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def init_state(model, tx, mesh, image_size, seed, shardings):
  """Initialise parameters and optimizer state directly in their target shardings."""
  n = batch_parallelism(mesh)

  def init(rng):
    params = nn.unbox(model.init(rng, *dummy_inputs(model, image_size, n)))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  with partitioning.activate(mesh):
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))

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


def load_initial_params(path, abstract_params, param_shardings, scan, image_cfg=None):
  """Weights written by `jaxret import-hf` (per-block layout), checked against the model (and
  `image_cfg`'s pixel normalisation against the imported one) and placed in the run's
  shardings; a fresh run starts from them."""
  import os

  from jaxret.errors import UserError
  from jaxret.export.hf_import import load_imported
  from jaxret.models.two_tower import scanned
  from jaxret.train.optim import param_paths

  if not os.path.isdir(os.path.join(path, "params")):
    raise UserError(f"model.init_from '{path}' is not a folder written by `jaxret import-hf` "
                    "(no params/ inside); run `jaxret import-hf HF_DIR --out FOLDER` first")
  _check_pixel_statistics(path, image_cfg)
  params = load_imported(path)
  if scan:
    params = scanned(params)
  got = dict(zip(jax.tree.leaves(param_paths(params)), jax.tree.leaves(params)))
  want = dict(zip(jax.tree.leaves(param_paths(abstract_params)), jax.tree.leaves(abstract_params)))
  for name in sorted(set(got) | set(want)):
    if name not in got or name not in want or tuple(got[name].shape) != tuple(want[name].shape):
      have = tuple(got[name].shape) if name in got else "nothing"
      need = tuple(want[name].shape) if name in want else "nothing"
      raise UserError(f"model.init_from '{path}' does not fit this model: parameter '{name}' is "
                      f"{have} there but {need} here; set the model section from its model.json")
  params = jax.tree.map(lambda a, ref: jnp.asarray(a, ref.dtype), params, abstract_params)
  return jax.device_put(params, param_shardings)


def _check_pixel_statistics(path, image_cfg):
  """Weights trained on other pixel statistics silently lose accuracy: refuse instead."""
  import json
  import os

  import numpy as np

  from jaxret.errors import UserError
  model_json = os.path.join(path, "model.json")
  if image_cfg is None or not os.path.exists(model_json):
    return
  with open(model_json) as f:
    image = json.load(f).get("image", {})
  for key in ("mean", "std"):
    if key in image and not np.allclose(image[key], image_cfg[key], atol=1e-6):
      raise UserError(f"model.init_from '{path}' was trained with model.image.{key}="
                      f"{tuple(image[key])} but this config has {tuple(image_cfg[key])}; set it "
                      "from its model.json")

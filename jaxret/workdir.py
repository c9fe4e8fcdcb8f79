"""Reading and writing a workdir and the folders around it: the run's saved config, its
checkpoints' parameters, and `jaxret import-hf` folders (weights a fresh run starts from).

Train, eval and export all open a workdir through here; none of them imports another to do it.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jaxret import config
from jaxret.checkpoint import Checkpointer
from jaxret.errors import UserError
from jaxret.models.two_tower import scanned
from jaxret.param_rules import param_paths


# ---------------------------------------------------------------------------- the run's config

def load_run_config(workdir):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"'{workdir}' holds no jaxret run (no config.json): pass the --workdir "
                    "that `jaxret train` wrote")
  with open(path) as f:
    return config.from_json(f.read())


def check_workdir_config(workdir, cfg):
  """A workdir belongs to one model and loss: say which key differs instead of failing later."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  new = json.loads(cfg.to_json())
  for section in ("model", "loss"):
    diff = _first_difference(saved.get(section, {}), new[section], section)
    if diff:
      key, old, now = diff
      raise UserError(f"workdir '{workdir}' holds a run of a different model: {key} is {old!r} "
                      f"there but {now!r} in this config; use a new --workdir, or the config "
                      "that wrote it")


def _first_difference(a, b, prefix):
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, dict) and isinstance(y, dict):
      d = _first_difference(x, y, f"{prefix}.{key}")
      if d:
        return d
    elif x != y:
      return f"{prefix}.{key}", x, y
  return None


def write_run_config(workdir, cfg):
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json(indent=2))


# ---------------------------------------------------------------------------- checkpoints

def restore_params(exp, workdir, step=None):
  """-> (params, step) from a workdir's checkpoint, in the experiment's shardings."""
  ckpt = Checkpointer(workdir, every=0, keep=None, async_save=False)
  steps = ckpt.all_steps()
  if not steps:
    raise UserError(f"'{workdir}' has no checkpoints yet: train first, or pick another workdir")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise UserError(f"'{workdir}' has no checkpoint at step {step}; available: "
                    f"{', '.join(map(str, sorted(steps)))}")
  state = ckpt.restore_state(step, exp.abstract_state)
  ckpt.close()
  return state.params, step


# ---------------------------------------------------------------------------- output folders

def check_out_dir(out, overwrite):
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out '{out}' is a file: pass a folder path")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise UserError(f"--out '{out}' is not empty: pass --overwrite to replace it, or pick a "
                    "new folder")


# ---------------------------------------------------------------------------- import-hf folders
# FOLDER/params/ (orbax, jaxret's per-block layout), FOLDER/model.json (the model section that
# builds the matching model), FOLDER/tokenizer.json (whose ids the token table follows).

def save_imported(out, updates, params, tokenizer_file, *, overwrite=False):
  import orbax.checkpoint as ocp
  check_out_dir(out, overwrite)
  if os.path.isdir(out):
    shutil.rmtree(out)
  os.makedirs(out)
  with open(os.path.join(out, "model.json"), "w") as f:
    json.dump(updates, f, indent=2)
  if tokenizer_file:
    shutil.copyfile(tokenizer_file, os.path.join(out, "tokenizer.json"))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(os.path.join(out, "params")), params)
  ckpt.wait_until_finished()


def load_imported(path, abstract_params=None):
  """-> params written by `save_imported` (onto `abstract_params`' shardings when given)."""
  import orbax.checkpoint as ocp
  ckpt = ocp.StandardCheckpointer()
  return ckpt.restore(os.path.abspath(os.path.join(path, "params")), abstract_params)


def load_initial_params(path, abstract_params, param_shardings, scan, image_cfg=None):
  """Weights written by `jaxret import-hf` (per-block layout), checked against the model (and
  `image_cfg`'s pixel normalisation against the imported one) and placed in the run's
  shardings; a fresh run starts from them."""
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

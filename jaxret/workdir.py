"""Reading and writing a workdir and the folders around it: the run's saved config, its
checkpoints' parameters, and `jaxret import-hf` folders (weights a fresh run starts from).

Train, eval and export all open a workdir through here; none of them imports another to do it.
"""
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jaxret import config
from jaxret.checkpoint import Checkpointer
from jaxret.errors import UserError
from jaxret.models.two_tower import scanned
from jaxret.param_rules import param_paths, rule_setting


# ---------------------------------------------------------------------------- the run's config

def load_run_config(workdir):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"'{workdir}' holds no jaxret run (no config.json): pass the --workdir "
                    "that `jaxret train` wrote")
  with open(path) as f:
    return config.from_json(f.read())


def check_workdir_config(workdir, cfg):
  """Resuming with a changed key that alters the run is refused, naming the key (see
  config.RESUME_TAGS); the mesh may change only at the process count that wrote the run."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _leaves(json.loads(config.from_json(f.read()).to_json()))
  new = _leaves(json.loads(cfg.to_json()))
  for key in sorted(set(saved) | set(new)):
    old, now = saved.get(key), new.get(key)
    if old == now:
      continue
    tag = config.resume_tag(key)
    if tag == config.FIXED:
      raise UserError(f"workdir '{workdir}' holds a run with {key}={old!r}, and changing it to "
                      f"{now!r} would not resume the same run; use a new --workdir, or keep "
                      f"{key}={old!r}")
    if tag == config.SAME_PROCESSES:
      wrote = _process_count(workdir)
      if wrote is not None and wrote != jax.process_count():  # None: nothing saved yet
        raise UserError(f"workdir '{workdir}': {key} changes from {old!r} to {now!r}, which "
                        f"needs the same process count as the run that wrote it ("
                        f"{wrote if wrote else 'unknown'}, now {jax.process_count()}), since "
                        f"each process reads its own rows; keep {key}={old!r}")


def _leaves(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_leaves(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _process_count(workdir):
  """How many processes wrote the latest checkpoint (its data/process_<i>-of-<n>.json)."""
  root = os.path.join(workdir, "checkpoints")
  steps = sorted((int(s) for s in os.listdir(root) if s.isdigit()), reverse=True) \
      if os.path.isdir(root) else []
  for step in steps:
    names = os.listdir(os.path.join(root, str(step), "data")) \
        if os.path.isdir(os.path.join(root, str(step), "data")) else []
    for name in names:
      if name.startswith("process_") and "-of-" in name:
        return int(name.split("-of-")[1].split(".")[0])
  return None


def write_run_config(workdir, cfg):
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json(indent=2))


# ---------------------------------------------------------------------------- checkpoints

def restore_params(abstract_state, workdir, step=None):
  """-> (params, step) from a workdir's checkpoint, placed as `abstract_state` (an abstract
  TrainState carrying shardings, e.g. Experiment.abstract_state) says."""
  ckpt = Checkpointer(workdir, every=0, keep=None, async_save=False)
  steps = ckpt.all_steps()
  if not steps:
    raise UserError(f"'{workdir}' has no checkpoints yet: train first, or pick another workdir")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise UserError(f"'{workdir}' has no checkpoint at step {step}; available: "
                    f"{', '.join(map(str, sorted(steps)))}")
  state = ckpt.restore_state(step, abstract_state)
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


def load_initial_params(path, abstract_params, param_shardings, scan, image_cfg=None, *,
                        rules=(), fresh=None):
  """Weights written by `jaxret import-hf` (per-block layout), checked against the model (and
  `image_cfg`'s pixel normalisation against the imported one) and placed in the run's
  shardings; a fresh run starts from them.

  Partial loading: parameters whose `load` setting under `rules` (optim.rules) is false keep
  their value in `fresh` (the run's fresh initialisation) and need not exist in the folder.
  Another shape: position embeddings are resampled to this model's (`resize_pos_embedding`);
  any other difference fails with the parameter named."""
  if not os.path.isdir(os.path.join(path, "params")):
    raise UserError(f"model.init_from '{path}' is not a folder written by `jaxret import-hf` "
                    "(no params/ inside); run `jaxret import-hf HF_DIR --out FOLDER` first")
  _check_pixel_statistics(path, image_cfg)
  params = load_imported(path)
  if scan:
    params = scanned(params)
  got = dict(zip(jax.tree.leaves(param_paths(params)), jax.tree.leaves(params)))
  names = jax.tree.leaves(param_paths(abstract_params))
  want = dict(zip(names, jax.tree.leaves(abstract_params)))
  load = dict(zip(names, jax.tree.leaves(rule_setting(
      abstract_params, rules, "load", lambda _: config.PARAM_SETTINGS["load"]))))
  if fresh is None and not all(load.values()):
    raise ValueError("load_initial_params: rules leave parameters unloaded; pass fresh=params")
  fresh_leaves = dict(zip(names, jax.tree.leaves(fresh))) if fresh is not None else {}
  leaves = {}
  for name in sorted(set(got) | set(want)):
    if name in want and not load[name]:
      leaves[name] = fresh_leaves[name]
      continue
    have = tuple(got[name].shape) if name in got else "nothing"
    need = tuple(want[name].shape) if name in want else "nothing"
    if name in got and name in want and have != need and name in POS_EMBEDDINGS:
      leaves[name] = resize_pos_embedding(name, np.asarray(got[name]), need,
                                          cls="image/cls" in want)
    elif have != need:
      raise UserError(f"model.init_from '{path}' does not fit this model: parameter '{name}' is "
                      f"{have} there but {need} here; set the model section from its model.json")
    else:
      leaves[name] = got[name]
  params = jax.tree.unflatten(jax.tree.structure(abstract_params), [leaves[n] for n in names])
  params = jax.tree.map(lambda a, ref: jnp.asarray(a, ref.dtype), params, abstract_params)
  return jax.device_put(params, param_shardings)


# Fine-tuning at another image size or text length: the position tables are resampled.
POS_EMBEDDINGS = ("image/pos_embedding", "text/pos_embedding")


def resize_pos_embedding(name, table, shape, cls):
  """[1, N, d] -> `shape` ([1, N', d]) for another image size or text length.

  image/pos_embedding: the cls row (when the model has a cls token) is kept as it is; the patch
  rows, a square grid, are resampled by 2-D bilinear interpolation as timm's
  resample_abs_pos_embed does, i.e. torch.nn.functional.interpolate(mode='bilinear',
  align_corners=False, antialias=False): half-pixel centres, edge samples clamped, and no
  antialiasing when shrinking (jax.image.resize's default antialias=True, which big_vision's
  resample_posemb uses, would differ from timm when shrinking).
  text/pos_embedding: the first N' rows when shorter (positions beyond a shorter context are
  never used); linear interpolation (same convention, 1-D) when longer."""
  (_, n, d), (_, m, d2) = table.shape, shape
  if d != d2:
    raise UserError(f"model.init_from: parameter '{name}' is {table.shape} there but {shape} "
                    "here; only the number of positions may differ (set the widths from its "
                    "model.json)")
  table = table.astype(np.float32)
  if name == "text/pos_embedding":
    if m <= n:
      return table[:, :m]
    return np.asarray(jax.image.resize(table, (1, m, d), "linear", antialias=False))
  extra = 1 if cls else 0
  old, new = math.isqrt(n - extra), math.isqrt(m - extra)
  if old * old != n - extra or new * new != m - extra:
    raise UserError(f"model.init_from: parameter '{name}' is {table.shape} there but {shape} "
                    "here, and only square patch grids can be resampled")
  grid = table[0, extra:].reshape(old, old, d)
  grid = np.asarray(jax.image.resize(grid, (new, new, d), "bilinear", antialias=False))
  return np.concatenate([table[:, :extra], grid.reshape(1, new * new, d)], axis=1)


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

"""Reading and writing a workdir and the folders around it: the run's saved config, its
checkpoints' parameters, and `jaxret import-hf` folders (weights a fresh run starts from).

Train, eval and export all open a workdir through here; none of them imports another to do it.
"""
import datetime
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from jaxret import config, storage
from jaxret.checkpoint import Checkpointer
from jaxret.data.sources import MANIFEST, file_sha256, load_manifest, parse_mixture
from jaxret.errors import UserError
from jaxret.models.two_tower import scanned
from jaxret.param_rules import param_paths, rule_setting


# ---------------------------------------------------------------------------- the run's config

def load_run_config(workdir):
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    raise UserError(f"'{workdir}' holds no jaxret run (no config.json): pass the --workdir "
                    "that `jaxret train` wrote")
  return config.from_json(storage.read_text(path))


def check_workdir_config(workdir, cfg):
  """Resuming with a changed key that alters the run is refused, naming the key (see
  config.RESUME_TAGS); the mesh may change only at the process count that wrote the run."""
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    return
  saved = _leaves(json.loads(config.from_json(storage.read_text(path)).to_json()))
  new = _leaves(json.loads(cfg.to_json()))
  for key in sorted(set(saved) | set(new)):
    old, now = saved.get(key), new.get(key)
    if old == now or _same_data_dir(key, old, now):
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


def absolute_data_dirs(cfg):
  """data.dir, data.mixture's and eval.sets' folders and eval.zeroshot_classes made absolute
  (a copy of `cfg`), so a run's saved config finds its data from any current directory."""
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.dir = storage.absolute(cfg.data.dir)
    cfg.data.mixture = tuple(f"{storage.absolute(d)}:{w!r}" for d, w in parse_mixture(cfg.data.mixture))
    cfg.eval.sets = tuple(f"{name}={storage.absolute(d) if d else ''}{':' + split if split else ''}"
                          for name, d, split in config.parse_eval_sets(cfg.eval.sets))
    if cfg.eval.zeroshot_classes:
      cfg.eval.zeroshot_classes = storage.absolute(cfg.eval.zeroshot_classes)
  return cfg


def _same_data_dir(key, old, now):
  """A run saved before data dirs were stored absolute names them relative to where it
  started; the same folder reached from there is the same data."""
  if key == "data.dir" and isinstance(old, str) and isinstance(now, str):
    return storage.absolute(old) == storage.absolute(now)
  if key == "data.mixture" and isinstance(old, list) and isinstance(now, list):
    norm = lambda m: [(storage.absolute(d), w) for d, w in parse_mixture(m)]  # noqa: E731
    return norm(old) == norm(now)
  return False


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
  root = storage.join(workdir, "checkpoints")
  steps = sorted((int(s) for s in storage.listdir(root) if s.isdigit()), reverse=True) \
      if storage.isdir(root) else []
  for step in steps:
    data = storage.join(root, str(step), "data")
    names = storage.listdir(data) if storage.isdir(data) else []
    for name in names:
      if name.startswith("process_") and "-of-" in name:
        return int(name.split("-of-")[1].split(".")[0])
  return None


def write_run_config(workdir, cfg):
  storage.write_text(storage.join(workdir, "config.json"), cfg.to_json(indent=2))


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


# ---------------------------------------------------------------------------- self-contained runs
# A workdir carries what evaluation and export need besides its checkpoints, so neither reads
# the training data's folder for it: a copy of the data's tokenizer, the data's manifest (split
# names and sizes, zero-shot classes), and where the run came from.
RUN_TOKENIZER_DIR = "tokenizer"        # <workdir>/tokenizer/<the manifest's tokenizer name>
DATA_MANIFEST = "data_manifest.json"   # a copy of <data.dir>/manifest.json
PROVENANCE = "provenance.json"         # {"starts": [one entry per `jaxret train` start]}
# Packages whose versions decide what a run computes or how it reads its files.
PROVENANCE_PACKAGES = ("jaxret", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                       "array-record", "numpy", "tokenizers", "sentencepiece", "pillow")


def save_run_files(workdir, cfg, data_dir, manifest):
  """Process 0, at every start of `jaxret train`: copies the tokenizer and manifest (first start
  only: data.dir is fixed for a run) and adds a provenance entry."""
  tok_src = os.path.join(data_dir, manifest["tokenizer"])
  tok_dir = storage.join(workdir, RUN_TOKENIZER_DIR)  # the workdir may be gs://...
  if not storage.exists(tok_dir):
    name = os.path.basename(os.path.normpath(manifest["tokenizer"]))
    if storage.is_remote(tok_dir):  # a bucket has no folder to swap in; objects appear whole
      storage.copy(tok_src, storage.join(tok_dir, name))
    else:
      tmp = tok_dir + ".tmp"
      if storage.exists(tmp):
        storage.rmtree(tmp)
      storage.copy(tok_src, storage.join(tmp, name))
      storage.rename(tmp, tok_dir)
  manifest_path = os.path.join(data_dir, MANIFEST)
  if not storage.exists(storage.join(workdir, DATA_MANIFEST)):
    storage.write_text(storage.join(workdir, DATA_MANIFEST), json.dumps(manifest, indent=2))
  prov_path = storage.join(workdir, PROVENANCE)
  prov = {"starts": []}
  if storage.exists(prov_path):
    prov = json.loads(storage.read_text(prov_path))
  prov["starts"].append(_provenance(cfg, manifest_path))
  storage.write_text(prov_path, json.dumps(prov, indent=2))


def _provenance(cfg, manifest_path):
  versions = {}
  for name in PROVENANCE_PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": shlex.join(sys.argv), "jaxret_commit": _git_commit(),
          "versions": versions, "python": sys.version.split()[0],
          "data_dir": cfg.data.dir, "manifest_sha256": file_sha256(manifest_path),
          "process_count": jax.process_count(), "device_kind": jax.devices()[0].device_kind,
          "device_count": jax.device_count()}


def _git_commit():
  """The jaxret checkout's commit ('+dirty' with local changes), or None for an installed
  package."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    run = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True,  # noqa: E731
                                    timeout=10, check=True).stdout.strip()
    commit = run("rev-parse", "HEAD")
    return commit + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
  except (OSError, subprocess.SubprocessError):
    return None


def run_tokenizer_path(workdir, cfg):
  """The run's own tokenizer: its copy in the workdir, else (runs from before the copy) the one
  its data's manifest names."""
  tok_dir = storage.join(workdir, RUN_TOKENIZER_DIR)
  if storage.isdir(tok_dir):
    names = storage.listdir(tok_dir)
    if len(names) == 1:  # tokenizers read local files: a bucket's copy is downloaded
      return storage.local_copy(storage.join(tok_dir, names[0]))
  return os.path.join(cfg.data.dir, load_manifest(cfg.data.dir)["tokenizer"])


def run_manifest(workdir, cfg):
  """The run's data manifest: its copy in the workdir, else the data's own."""
  path = storage.join(workdir, DATA_MANIFEST)
  if storage.isfile(path):
    return json.loads(storage.read_text(path))
  return load_manifest(cfg.data.dir)


def read_jsonl(path):
  """The rows of a JSON-lines file (metrics.jsonl); a line that does not parse (torn by a
  killed run) is dropped."""
  out = []
  for line in storage.read_text(path).splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      continue
  return out


def read_metrics(workdir):
  """The logged rows of a run: its workdir's metrics.jsonl (see read_jsonl)."""
  return read_jsonl(storage.join(workdir, "metrics.jsonl"))

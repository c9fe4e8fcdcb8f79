"""`jaxret.load(path)`: a model from any of the three folders jaxret writes.

  workdir          config.json + checkpoints/ (`jaxret train`); the tokenizer is the workdir's
                   own tokenizer.json / tokenizer.model when it has one, else its data's
  transformers     config.json with model_type clip / siglip + model.safetensors (`jaxret export`)
  import-hf        params/ + model.json + tokenizer.json (`jaxret import-hf`)

Whatever mesh trained it, the model lands on a data-parallel mesh of every local device
(parameters replicated: inference models are small beside their batches).
"""
import json
import os

import jax
import numpy as np

from jaxret import config, storage
from jaxret.data.tokenizers import load_tokenizer
from jaxret.errors import UserError
from jaxret.experiment import dummy_inputs, state_shardings
from jaxret.inference.model import Model
from jaxret.losses import get_loss
from jaxret.models.attention import for_platform
from jaxret.models.two_tower import build_model, scanned
from jaxret.optim import make_optimizer
from jaxret.parallel import partitioning
from jaxret.parallel.mesh import make_mesh
from jaxret.workdir import load_imported, load_run_config, restore_params, run_tokenizer_path

OWN_TOKENIZERS = ("tokenizer.json", "tokenizer.model")


def load(path, step=None, *, batch_size=64, devices=None):
  """-> Model. `step`: a workdir's checkpoint (default: the latest); `batch_size`: the padded
  batch every call is compiled for (rounded up to a multiple of the devices)."""
  path = os.fspath(path)
  kind = folder_kind(path)
  if step is not None and kind != "workdir":
    raise UserError(f"step={step}: '{path}' is a {kind} folder with one set of weights; "
                    "steps belong to workdirs")
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1},
                   devices if devices is not None else jax.local_devices())
  opts = dict(batch_size=batch_size, path=storage.absolute(path))
  if kind == "workdir":
    return _load_workdir(path, step, mesh, opts)
  if storage.is_remote(path):
    raise UserError(f"model '{path}': only workdirs load from a bucket; copy the {kind} folder "
                    "to local disk (`gcloud storage cp -r`) and load that")
  if kind == "transformers":
    from jaxret.export.hf_import import import_hf
    updates, params, tok_file = import_hf(path)
    return _from_weights(path, updates, params, tok_file, mesh, opts)
  with open(os.path.join(path, "model.json")) as f:
    updates = json.load(f)
  tok_file = os.path.join(path, "tokenizer.json")
  return _from_weights(path, updates, load_imported(path), tok_file, mesh, opts)


def folder_kind(path):
  """'workdir', 'transformers' or 'import-hf'; a UserError naming the three otherwise."""
  if not storage.isdir(path):
    raise UserError(f"model '{path}' not found: pass a workdir, a `jaxret export` folder or a "
                    "`jaxret import-hf` folder")
  if storage.isdir(storage.join(path, "params")) and \
      storage.isfile(storage.join(path, "model.json")):
    return "import-hf"
  cfg = storage.join(path, "config.json")
  if storage.isfile(cfg):
    try:
      saved = json.loads(storage.read_text(cfg))
    except json.JSONDecodeError as e:
      raise UserError(f"'{cfg}' is not valid JSON ({e})") from None
    if "model_type" in saved:
      return "transformers"
    if storage.isdir(storage.join(path, "checkpoints")):
      return "workdir"
    raise UserError(f"workdir '{path}' has no checkpoints yet: train first, or pick another")
  raise UserError(f"'{path}' is not a jaxret model: expected a workdir (config.json + "
                  "checkpoints/), a `jaxret export` folder (config.json + model.safetensors) "
                  "or a `jaxret import-hf` folder (params/ + model.json)")


def workdir_tokenizer(workdir, cfg):
  """The run's own tokenizer (workdir.run_tokenizer_path); a tokenizer.json / tokenizer.model
  saved by hand in the workdir's root wins."""
  for name in OWN_TOKENIZERS:
    own = storage.join(workdir, name)
    if storage.isfile(own):
      return storage.local_copy(own)  # tokenizers read local files
  return run_tokenizer_path(workdir, cfg)


def _load_workdir(workdir, step, mesh, opts):
  cfg = load_run_config(workdir)
  tok = load_tokenizer(workdir_tokenizer(workdir, cfg), cfg.model.text.max_len)
  # The run's attention where these devices have it, else xla (same parameters).
  attention = for_platform(cfg.model.get("attention", "xla"), mesh.devices.flat[0].platform,
                           cfg.model.dtype)
  model = build_model(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id,
                      attention=attention)
  # The checkpoint holds the whole train state: restore it into this mesh (orbax reshards),
  # keep the parameters.
  tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
  abstract, shardings = state_shardings(model, tx, mesh, cfg.model.image.size)
  params, step = restore_params(abstract, workdir, step)
  loss = get_loss(cfg.loss.name, cfg.loss)
  late = loss.similarity == "late_interaction"
  drop = late and not cfg.loss.get("filip_special_tokens", True)
  return Model(model, params, tok, mesh, shardings.params, image_size=cfg.model.image.size,
               drop_special_tokens=drop, late_interaction=late, step=int(step), **opts)


def _from_weights(path, updates, params, tok_file, mesh, opts):
  """An exported or imported model: its model section, per-block params, its tokenizer."""
  if not tok_file or not os.path.isfile(tok_file):
    raise UserError(f"'{path}' has no tokenizer.json: save the tokenizer beside the weights")
  model_cfg = config.merge({"model": updates}).model
  tok = load_tokenizer(tok_file, model_cfg.text.max_len)
  model = build_model(model_cfg, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                      eos_id=tok.eos_id)
  if model_cfg.scan:
    params = scanned(params)
  rows = params["text"]["token_embedding"]["embedding"].shape[0]
  if rows != tok.vocab_size:
    raise UserError(f"'{path}': the token table has {rows} rows but its tokenizer "
                    f"{tok.vocab_size} ids; re-export the model with its tokenizer")
  n = mesh.size
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                            *dummy_inputs(model, model_cfg.image.size, n)))
  shardings = partitioning.logical_shardings(boxed, mesh)["params"]
  params = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float32), params), shardings)
  return Model(model, params, tok, mesh, shardings, image_size=model_cfg.image.size, **opts)

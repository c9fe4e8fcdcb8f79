"""Export: jaxret params -> a transformers folder that `CLIPModel.from_pretrained` or
`SiglipModel.from_pretrained` loads (config.json, model.safetensors, tokenizer and image
processor files).

`jaxret export --workdir DIR [--step N] --format hf --out OUT [--overwrite]` restores the
checkpoint on one CPU device (whatever mesh trained it) and writes OUT. Every check runs before
the first byte is written; the folder is assembled beside OUT and moved into place at the end.
"""
import math
import os
import shutil
import tempfile

import jax
import numpy as np

from jaxret import storage
from jaxret.errors import UserError
from jaxret.export import convert, processor, targets
from jaxret.models.two_tower import unscanned
from jaxret.param_rules import param_paths
from jaxret.workdir import (check_out_dir, load_run_config, restore_params, run_manifest,
                            run_tokenizer_path)


def flatten(params):
  """{'image/encoder/.../kernel': np.ndarray} (float32: the exported precision), with scanned
  encoders unstacked into their per-block names."""
  params = unscanned(params)
  names = jax.tree.leaves(param_paths(params))
  return {n: np.asarray(jax.device_get(v), np.float32)
          for n, v in zip(names, jax.tree.leaves(params))}


def state_dict(target, model_cfg, flat, perm):
  """{torch key: np.ndarray} in the target's layout."""
  flat = dict(flat)
  # Inference-time values: transformers applies exp(logit_scale) uncapped; jaxret caps it.
  flat["t"] = np.minimum(flat["t"], np.float32(math.log(model_cfg.max_scale)))
  if target == "siglip":
    # SigLIP always has these; a jaxret model without them is the same model with zeros.
    d = model_cfg.image.width
    flat.setdefault("image/patch_embed/bias", np.zeros(d, np.float32))
    flat.setdefault("txt_proj/bias", np.zeros(model_cfg.embed_dim, np.float32))
    flat.setdefault("b", np.zeros((), np.float32))
  # Rows follow the exported tokenizer's ids (see processor.py for why they can move).
  flat["text/token_embedding/embedding"] = flat["text/token_embedding/embedding"][perm]
  return convert.to_torch_layout(convert.rules(target, model_cfg), flat)


def _check_against_transformers(target, hf_cfg, tensors):
  """Same keys and shapes as the transformers class builds (on the meta device: no memory)."""
  import torch
  import transformers
  cls = transformers.CLIPModel if target == "clip" else transformers.SiglipModel
  with torch.device("meta"):
    ref = {k: tuple(v.shape) for k, v in cls(hf_cfg).state_dict().items()}
  got = {k: tuple(v.shape) for k, v in tensors.items()}
  if ref != got:
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    bad = sorted(k for k in set(ref) & set(got) if ref[k] != got[k])
    raise AssertionError(f"export table out of step with transformers {cls.__name__}: "
                         f"missing {missing[:3]}, extra {extra[:3]}, shape {bad[:3]}")


def export_params(model_cfg, params, tokenizer_path, out, *, overwrite=False):
  """Write `params` (of the model `model_cfg` describes) as a transformers folder -> target."""
  from safetensors.numpy import save_file
  target = targets.check_exportable(model_cfg)
  check_out_dir(out, overwrite)
  flat = flatten(params)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    perm, ids = processor.write_processor(tmp, target, tokenizer_path, model_cfg.image,
                                          model_cfg.text.max_len)
    tensors = state_dict(target, model_cfg, flat, perm)
    hf_cfg = targets.hf_config(target, model_cfg, vocab_size=len(perm), special_ids=ids,
                               log_scale=float(tensors["logit_scale"].reshape(())))
    _check_against_transformers(target, hf_cfg, tensors)
    hf_cfg.save_pretrained(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target


def restore_on_cpu(workdir, step=None):
  """-> (run config, params, step, tokenizer path), on one CPU device whatever the run's mesh."""
  from jaxret.experiment import Experiment
  cfg = load_run_config(workdir)
  # Checks that need no arrays come first, so a bad request restores nothing.
  targets.check_exportable(cfg.model)
  if not storage.isdir(storage.join(workdir, "checkpoints")):
    raise UserError(f"'{workdir}' has no checkpoints yet: train first, or pick another workdir")
  with cfg.unlocked():
    cfg.mesh.update(data=1, fsdp=1, tensor=1)  # orbax reshards onto the one device
    cfg.batch_size = 1
  # The workdir's own tokenizer and manifest: export does not need the training data.
  exp = Experiment(cfg, devices=jax.devices("cpu")[:1], manifest=run_manifest(workdir, cfg),
                   tokenizer_path=run_tokenizer_path(workdir, cfg))
  params, step = restore_params(exp.abstract_state, workdir, step)
  return cfg, params, step, exp.tokenizer_path


def export_workdir(workdir, out, *, step=None, overwrite=False):
  """`jaxret export`: a workdir's checkpoint -> transformers folder at `out`."""
  workdir = storage.absolute(workdir)  # may be gs://...; `out` is a local folder
  if storage.is_remote(out):
    raise UserError(f"--out '{out}': export writes a local folder; write it locally, then copy "
                    "it to the bucket (`gcloud storage cp -r OUT gs://...`)")
  check_out_dir(out, overwrite)
  cfg, params, step, tokenizer = restore_on_cpu(workdir, step)
  target = export_params(cfg.model, params, tokenizer, out, overwrite=overwrite)
  cls = "CLIPModel" if target == "clip" else "SiglipModel"
  print(f"exported {workdir} step {step} to {out}: load with transformers.{cls}"
        f".from_pretrained({out!r})", flush=True)
  return target

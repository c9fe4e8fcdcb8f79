"""Import: a transformers CLIPModel / SiglipModel folder -> jaxret params, for fine-tuning.

`jaxret import-hf DIR --out CKPT [--tokenizer TOKENIZER.json]` writes
  CKPT/params/         the parameters (orbax), in jaxret's layout
  CKPT/model.json      the `model` config section that builds the matching model
  CKPT/tokenizer.json  the tokenizer whose ids the token table follows
With --tokenizer (e.g. the data's tokenizer.json) the token table is reordered to that
tokenizer's ids by token string, which also undoes the id swap `jaxret export` makes for CLIP.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxret.errors import UserError
from jaxret.export import convert, targets
from jaxret.param_rules import param_paths
from jaxret.workdir import check_out_dir, save_imported

TABLE = "text/token_embedding/embedding"


def read_weights(hf_dir):
  """{key: np.ndarray} from model.safetensors (or its sharded index)."""
  from safetensors.numpy import load_file
  single = os.path.join(hf_dir, "model.safetensors")
  index = single + ".index.json"
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index) as f:
      files = sorted({os.path.join(hf_dir, v) for v in json.load(f)["weight_map"].values()})
  else:
    raise UserError(f"'{hf_dir}' has no model.safetensors: pass a transformers model folder "
                    "saved with safetensors")
  out = {}
  for path in files:
    out.update(load_file(path))
  # Older checkpoints persist the position-id buffers; they are not parameters.
  return {k: v.astype(np.float32) for k, v in out.items() if not k.endswith(".position_ids")}


def read_config(hf_dir):
  import transformers
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"'{hf_dir}' has no config.json: pass a transformers model folder")
  with open(path) as f:
    kind = json.load(f).get("model_type")
  if kind not in ("clip", "siglip"):
    what = f"a transformers '{kind}' model" if kind else "no transformers model (no model_type)"
    raise UserError(f"'{hf_dir}' holds {what}; jaxret imports 'clip' (CLIPModel) and 'siglip' "
                    "(SiglipModel) folders")
  cfg = transformers.AutoConfig.from_pretrained(hf_dir)
  if cfg.model_type == "siglip" and cfg.text_config.projection_size != cfg.vision_config.hidden_size:
    raise UserError(f"'{hf_dir}': SigLIP text projection_size "
                    f"{cfg.text_config.projection_size} differs from the vision width "
                    f"{cfg.vision_config.hidden_size}; jaxret needs them equal")
  return cfg.model_type, cfg


def _vocab(path):
  import tokenizers as hf
  tok = hf.Tokenizer.from_file(path)
  return tok, tok.get_vocab(with_added_tokens=True)


def token_rows(hf_dir, tokenizer_path):
  """-> (rows, tokenizer file): row r of the new table is row rows[r] of the folder's table."""
  own = os.path.join(hf_dir, "tokenizer.json")
  if tokenizer_path is None:
    return None, own if os.path.isfile(own) else None
  if not os.path.isfile(own):
    raise UserError(f"'{hf_dir}' has no tokenizer.json to match --tokenizer against")
  if not os.path.isfile(tokenizer_path):
    raise UserError(f"--tokenizer '{tokenizer_path}' not found")
  _, theirs = _vocab(own)
  mine, _ = _vocab(tokenizer_path)
  words = [mine.id_to_token(i) for i in range(mine.get_vocab_size(with_added_tokens=True))]
  missing = [w for w in words if w not in theirs]
  if missing:
    raise UserError(f"{len(missing)} tokens of '{tokenizer_path}' (e.g. {missing[0]!r}) are not "
                    f"in the vocabulary of '{hf_dir}'; use the tokenizer the model was trained "
                    "with")
  return np.array([theirs[w] for w in words]), tokenizer_path


def pixel_statistics(hf_dir):
  """The image processor's normalisation (OpenAI CLIP's mean/std, SigLIP's 0.5) as
  model.image.mean/std; nothing when the folder has no preprocessor_config.json."""
  path = os.path.join(hf_dir, "preprocessor_config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    pre = json.load(f)
  if not pre.get("do_normalize", True) or "image_mean" not in pre:
    return {}
  return {"mean": [float(v) for v in pre["image_mean"]], "std": [float(v) for v in pre["image_std"]]}


def import_hf(hf_dir, tokenizer_path=None):
  """-> (model section dict, params pytree of np.float32, tokenizer file or None)."""
  from jaxret import config
  from jaxret.models.two_tower import build_model
  target, hf_cfg = read_config(hf_dir)
  tensors = read_weights(hf_dir)
  if "logit_scale" not in tensors:
    raise UserError(f"'{hf_dir}/model.safetensors' has no logit_scale: save the whole "
                    f"{'CLIPModel' if target == 'clip' else 'SiglipModel'}, not one tower")
  updates = targets.model_updates(target, hf_cfg, float(tensors["logit_scale"].reshape(())))
  updates["image"].update(pixel_statistics(hf_dir))
  rows, tok_file = token_rows(hf_dir, tokenizer_path)
  if rows is not None:
    tensors["text_model.embeddings.token_embedding.weight"] = (
        tensors["text_model.embeddings.token_embedding.weight"][rows])
    updates["text"]["vocab_size"] = len(rows)
  model_cfg = config.merge({"model": updates}).model
  model = build_model(model_cfg)
  s, length = model_cfg.image.size, model_cfg.text.max_len
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1, length), jnp.int32)))
  abstract = jax.tree.map(lambda x: getattr(x, "value", x), abstract["params"],
                          is_leaf=lambda x: hasattr(x, "value"))
  names = param_paths(abstract)
  shapes = {n: a.shape for n, a in zip(jax.tree.leaves(names), jax.tree.leaves(abstract))}
  try:
    flat = convert.to_jax_layout(convert.rules(target, model_cfg), tensors, shapes)
  except (KeyError, ValueError) as e:
    raise UserError(f"'{hf_dir}' does not match its config.json ({e}); re-save it with "
                    "transformers") from None
  params = jax.tree.map(lambda n: flat[n], names)
  return updates, params, tok_file


def import_to(hf_dir, out, *, tokenizer_path=None, overwrite=False):
  """`jaxret import-hf`."""
  check_out_dir(out, overwrite)
  updates, params, tok_file = import_hf(hf_dir, tokenizer_path)
  save_imported(out, updates, params, tok_file, overwrite=overwrite)
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  print(f"imported {hf_dir} ({n / 1e6:.1f}M parameters) to {out}; set the run's model section "
        f"from {os.path.join(out, 'model.json')}", flush=True)

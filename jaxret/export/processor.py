"""The exported tokenizer and image processor: the same ids and pixels jaxret's eval path makes.

Images: jaxret evaluates (x / 255 - mean) / std (`model.image.mean/std`) on the shorter side
resized to `model.image.size` and center-cropped; the CLIP processor does the same. SigLIP's
processor (as Google's) resizes to the square without cropping: the same pixels for square
images, a squeeze for others.

Text: the run's own tokenizer.json, with one twist. transformers' CLIPTextTransformer pools
with `input_ids.argmax(-1)` (the highest id, OpenAI's legacy) whenever `eos_token_id == 2`,
which is the demo tokenizer's end token. For CLIP we then swap the ids of [EOS] and [BOS]
(tokenizer.json and the rows of the token table together), so the exported config's eos id is
not 2 and transformers pools at the first end token, as jaxret does.
"""
import json

import numpy as np

from jaxret.data.tokenizers import BOS, EOS, PAD, UNK
from jaxret.errors import UserError

LEGACY_CLIP_EOS = 2


def read_tokenizer(path):
  with open(path) as f:
    spec = json.load(f)
  import tokenizers as hf
  tok = hf.Tokenizer.from_str(json.dumps(spec))
  ids = {k: tok.token_to_id(t) for k, t in (("pad", PAD), ("bos", BOS), ("eos", EOS))}
  missing = [k for k, v in ids.items() if v is None]
  if missing:
    raise UserError(f"tokenizer '{path}' has no {', '.join(missing)} token: export needs "
                    f"{PAD}, {BOS} and {EOS}")
  return spec, ids, tok.get_vocab_size(with_added_tokens=True)


def id_permutation(target, ids, vocab_size):
  """-> perm with new_id -> old_id (identity unless CLIP's legacy eos id needs moving)."""
  perm = np.arange(vocab_size)
  if target == "clip" and ids["eos"] == LEGACY_CLIP_EOS:
    perm[ids["eos"]], perm[ids["bos"]] = ids["bos"], ids["eos"]
  return perm


def permute_spec(spec, perm, path):
  """tokenizer.json data with every id renamed by `perm` (an involution: a swap)."""
  if (perm == np.arange(len(perm))).all():
    return spec
  spec = json.loads(json.dumps(spec))
  new = {int(old): new for new, old in enumerate(perm)}  # old id -> new id
  for t in spec.get("added_tokens") or []:
    t["id"] = new[t["id"]]
  vocab = spec.get("model", {}).get("vocab")
  if isinstance(vocab, dict):  # WordLevel, WordPiece, BPE
    spec["model"]["vocab"] = {tok: new[i] for tok, i in vocab.items()}
  elif isinstance(vocab, list):  # Unigram: the id is the position
    spec["model"]["vocab"] = [vocab[int(old)] for old in perm]
  else:
    raise UserError(f"tokenizer '{path}' has a model type the exporter cannot renumber; "
                    "rebuild the data with an end token id other than 2")

  def walk(node):  # post-processor special tokens carry their ids
    if isinstance(node, dict):
      if "ids" in node and isinstance(node["ids"], list):
        node["ids"] = [new[i] for i in node["ids"]]
      for v in node.values():
        walk(v)
    elif isinstance(node, list):
      for v in node:
        walk(v)
  walk(spec.get("post_processor"))
  return spec


def write_tokenizer(out, spec, target, max_len):
  import tokenizers as hf
  from transformers import PreTrainedTokenizerFast
  backend = hf.Tokenizer.from_str(json.dumps(spec))
  extra = {"unk_token": UNK} if backend.token_to_id(UNK) is not None else {}
  tok = PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS,
      model_max_length=max_len,
      # SigLIP's text tower attends to padding (it is trained padded to max_len, unmasked).
      model_input_names=["input_ids"] if target == "siglip" else ["input_ids", "attention_mask"],
      **extra)
  tok.save_pretrained(out)
  return tok


def image_processor(target, size, mean, std):
  common = dict(do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(mean), image_std=list(std), do_convert_rgb=True)
  if target == "clip":
    from transformers import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": size}, do_center_crop=True,
                                 crop_size={"height": size, "width": size}, **common)
  from transformers import SiglipImageProcessorPil
  return SiglipImageProcessorPil(size={"height": size, "width": size}, **common)


def write_processor(out, target, tokenizer_path, image_cfg, max_len):
  """Writes tokenizer and image-processor files; -> (perm new->old, exported special ids)."""
  spec, ids, vocab_size = read_tokenizer(tokenizer_path)
  perm = id_permutation(target, ids, vocab_size)
  spec = permute_spec(spec, perm, tokenizer_path)
  tok = write_tokenizer(out, spec, target, max_len)
  image_processor(target, image_cfg.size, image_cfg.mean, image_cfg.std).save_pretrained(out)
  new_ids = {"pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}
  inverse = np.argsort(perm)
  assert all(new_ids[k] == inverse[ids[k]] for k in ids), (new_ids, ids)
  return perm, new_ids

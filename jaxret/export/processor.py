"""The exported tokenizer and image processor: the same ids and pixels jaxret's eval path makes.

Images: jaxret evaluates (x / 255 - mean) / std (`model.image.mean/std`) on the shorter side
resized to `model.image.size` and center-cropped; the CLIP processor does the same. SigLIP's
processor (as Google's) resizes to the square without cropping: the same pixels for square
images, a squeeze for others.

Text: the run's own tokenizer, whatever its kind (an HF tokenizer.json, CLIP's vocab.json +
merges.txt, a unigram SentencePiece .model), written as an HF tokenizer.json that frames texts as
jaxret does: `AutoTokenizer.from_pretrained(out)(texts, padding="max_length",
max_length=model.text.max_len, truncation=True)` gives jaxret's ids for texts cleaned as jaxret
cleans them (`jaxret.data.tokenizers.clean_text`, what every jaxret tokenizer's `clean` does).
CLIP's vocab.json + merges.txt are written beside it when the tokenizer is a byte-level BPE.

One twist: transformers' CLIPTextTransformer pools with `input_ids.argmax(-1)` (the highest id,
OpenAI's legacy) whenever `eos_token_id == 2`, which is the demo tokenizer's end token. For CLIP
we then swap the end token's id with the start token's (or, without one, the pad or first
token's): tokenizer.json and the rows of the token table together, so the exported config's eos
id is not 2 and transformers pools at the first end token, as jaxret does.
"""
import json

import numpy as np

from jaxret.data.tokenizers import load_tokenizer, write_clip_files
from jaxret.errors import UserError

LEGACY_CLIP_EOS = 2


def read_tokenizer(path, max_len):
  """-> (tokenizer.json data framing texts as jaxret does, {'pad', 'bos', 'eos'} ids (bos may be
  None), vocabulary size), from any tokenizer `load_tokenizer` reads."""
  tok = load_tokenizer(path, max_len)
  spec = json.loads(tok.to_hf().to_str())
  return spec, {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id}, tok.vocab_size


def id_permutation(target, ids, vocab_size):
  """-> perm with new_id -> old_id (identity unless CLIP's legacy eos id needs moving)."""
  perm = np.arange(vocab_size)
  eos = ids["eos"]
  if target == "clip" and eos == LEGACY_CLIP_EOS:
    other = next(i for i in (ids["bos"], ids["pad"], 0) if i is not None and i != eos)
    perm[eos], perm[other] = other, eos
  return perm


def permute_spec(spec, perm, path):
  """tokenizer.json data with every id renamed by `perm` (an involution: a swap)."""
  if (perm == np.arange(len(perm))).all():
    return spec
  spec = json.loads(json.dumps(spec))
  new = {int(old): new for new, old in enumerate(perm)}  # old id -> new id
  for t in spec.get("added_tokens") or []:
    t["id"] = new[t["id"]]
  model = spec.get("model", {})
  vocab = model.get("vocab")
  if isinstance(vocab, dict):  # WordLevel, WordPiece, BPE
    model["vocab"] = {tok: new[i] for tok, i in vocab.items()}
  elif isinstance(vocab, list):  # Unigram: the id is the position
    model["vocab"] = [vocab[int(old)] for old in perm]
    if model.get("unk_id") is not None:
      model["unk_id"] = new[model["unk_id"]]
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


def _unk_token(spec):
  model = spec.get("model", {})
  if model.get("type") == "Unigram":
    unk = model.get("unk_id")
    return None if unk is None else model["vocab"][unk][0]
  return model.get("unk_token")


def write_tokenizer(out, spec, target, max_len, ids):
  """Writes tokenizer.json + tokenizer_config.json (and CLIP's vocab.json + merges.txt for a
  byte-level BPE) into `out`; `ids` are the exported {'pad', 'bos', 'eos'} ids."""
  import tokenizers as hf
  from transformers import PreTrainedTokenizerFast
  backend = hf.Tokenizer.from_str(json.dumps(spec))
  names = {f"{k}_token": backend.id_to_token(i) for k, i in ids.items() if i is not None}
  unk = _unk_token(spec)
  if unk is not None and backend.token_to_id(unk) is not None:
    names["unk_token"] = unk
  tok = PreTrainedTokenizerFast(
      tokenizer_object=backend, model_max_length=max_len,
      # SigLIP's text tower attends to padding (it is trained padded to max_len, unmasked).
      model_input_names=["input_ids"] if target == "siglip" else ["input_ids", "attention_mask"],
      **names)
  tok.save_pretrained(out)
  model = spec.get("model", {})
  if model.get("type") == "BPE" and model.get("end_of_word_suffix") == "</w>":
    # CLIP's own files too, for code that reads them (CLIPTokenizer, open_clip-style loaders).
    vocab = dict(model["vocab"])
    for t in spec.get("added_tokens") or []:
      vocab.setdefault(t["content"], t["id"])
    write_clip_files(vocab, model["merges"], out)
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
  spec, ids, vocab_size = read_tokenizer(tokenizer_path, max_len)
  perm = id_permutation(target, ids, vocab_size)
  spec = permute_spec(spec, perm, tokenizer_path)
  inverse = np.argsort(perm)  # old id -> new id
  new_ids = {k: None if i is None else int(inverse[i]) for k, i in ids.items()}
  write_tokenizer(out, spec, target, max_len, new_ids)
  image_processor(target, image_cfg.size, image_cfg.mean, image_cfg.std).save_pretrained(out)
  return perm, new_ids

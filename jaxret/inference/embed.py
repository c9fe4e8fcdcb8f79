"""`jaxret embed`: a model's embeddings of an image folder, a captions file or a data split,
written shard by shard to an embedding store (store.py); rerun to resume.

Items are planned up front in a fixed order (sorted image paths, caption lines, record
indices), so shard i always holds the same items and a rerun only embeds missing shards.
Unreadable images and broken records are skipped with a warning (their ids are left out).
"""
import math
import os
import sys

import numpy as np

from jaxret.data import sources, transforms
from jaxret.errors import UserError
from jaxret.inference import images as images_mod, store as store_mod
from jaxret.inference.loaders import load

DEFAULT_SHARD_SIZE = 10_000


def plan_items(*, images=None, captions=None, data=None, split="test"):
  """-> (kind, source dict, ids): exactly one of images / captions / data."""
  given = [n for n, v in (("--images", images), ("--captions", captions), ("--data", data)) if v]
  if len(given) != 1:
    raise UserError("pass exactly one of --images FOLDER, --captions FILE, --data DIR"
                    + (f" (got {', '.join(given)})" if given else ""))
  if images:
    return "image", {"images": os.path.abspath(images)}, images_mod.list_folder(images)
  if captions:
    if not os.path.isfile(captions):
      raise UserError(f"--captions '{captions}' not found: pass a text file, one caption a line")
    with open(captions, encoding="utf-8") as f:
      ids = [{"line": n, "text": line.strip()} for n, line in enumerate(f, 1) if line.strip()]
    if not ids:
      raise UserError(f"--captions '{captions}' holds no captions (one per line)")
    return "text", {"captions": os.path.abspath(captions)}, ids
  n = len(sources.open_split(data, split))
  if not n:
    raise UserError(f"split '{split}' of '{data}' holds no records")
  return "image", {"data": os.path.abspath(data), "split": split}, list(range(n))


class ItemReader:
  """Loads the inputs of planned ids: uint8 images at the model size, or caption texts."""

  def __init__(self, source, model):
    self.source, self.model = source, model
    self._records = None
    if "data" in source:
      self._records = sources.open_split(source["data"], source["split"])
      self._decode = transforms.DecodeRecord(skip_bad=True)

  def raw_image(self, item):
    """An image id -> uint8 [H,W,3] at its stored size; None (with a warning) if unusable."""
    if self._records is not None:
      out = self._decode.map(self._records[item])
      if "bad" in out:
        print(f"jaxret: warning: skipping record {item}: {out['bad']}", file=sys.stderr)
        return None
      return out["image"]
    try:
      return images_mod.open_image(os.path.join(self.source["images"], item))
    except UserError as e:
      print(f"jaxret: warning: skipping {e}", file=sys.stderr)
      return None

  def load(self, ids):
    """-> (kept ids, model input array)."""
    if "captions" in self.source:
      return ids, self.model.tokenizer.encode_batch([i["text"] for i in ids])
    kept, arrays = [], []
    for item in ids:
      im = self.raw_image(item)
      if im is not None:
        kept.append(item)
        arrays.append(self.model.preprocess(im))
    return kept, (np.stack(arrays) if arrays else None)


def embed_to_store(model_path, out, *, images=None, captions=None, data=None, split="test",
                   tokens=False, shard_size=DEFAULT_SHARD_SIZE, step=None, batch_size=64,
                   progress=True, max_shards=None, model=None):
  """Writes (or finishes) the store at `out`; -> its meta dict. `max_shards` stops after that
  many new shards (an interruption, for tests); `model` reuses an already loaded model."""
  if shard_size < 1:
    raise UserError(f"--shard-size must be at least 1, got {shard_size}")
  kind, source, ids = plan_items(images=images, captions=captions, data=data, split=split)
  model = model or load(model_path, step, batch_size=batch_size)
  if tokens and not model.late_interaction:
    print(f"jaxret: note: {model_path} was not trained with late interaction; storing its "
          "token embeddings anyway", file=sys.stderr)
  plan = {"model": model.path, "step": model.step, "kind": kind, "source": source,
          "dim": model.embed_dim, "shard_size": int(shard_size),
          "num_shards": math.ceil(len(ids) / shard_size), "tokens": bool(tokens)}
  meta = store_mod.begin(out, plan)
  todo = [i for i in range(plan["num_shards"]) if not store_mod.shard_done(out, i)]
  reader = ItemReader(source, model)
  bar = None
  if progress:
    from tqdm import tqdm
    done = len(ids) - sum(len(ids[i * shard_size:(i + 1) * shard_size]) for i in todo)
    bar = tqdm(total=len(ids), initial=done, unit=kind, desc=f"embed {os.path.basename(out)}")
  for n, i in enumerate(todo):
    if max_shards is not None and n >= max_shards:
      break
    chunk = ids[i * shard_size:(i + 1) * shard_size]
    kept, array = reader.load(chunk)
    if array is None:
      store_mod.write_shard(out, i, [], np.zeros((0, model.embed_dim)))
    elif tokens:
      e = model.embed_arrays(kind, array, tokens=True)
      store_mod.write_shard(out, i, kept, e["emb"], e["tokens"], e["mask"])
    else:
      store_mod.write_shard(out, i, kept, model.embed_arrays(kind, array))
    if bar:
      bar.update(len(chunk))
  if bar:
    bar.close()
  if all(store_mod.shard_done(out, i) for i in range(plan["num_shards"])):
    meta = store_mod.finish(out, meta)
    if progress:
      print(f"wrote {meta['count']} {kind} embeddings (dim {meta['dim']}) to {out}", flush=True)
  return meta

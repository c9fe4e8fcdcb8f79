"""The embedding store `jaxret embed` writes and `jaxret search` reads.

  STORE/store.json          {"format", "model", "step", "kind" (image|text), "source", "dim",
                             "shard_size", "num_shards", "tokens", "count", "complete"}
  STORE/emb-00000.npy       float16 [m, d], L2-normalised (rows of shard 0)
  STORE/ids-00000.json      the m ids: image relative paths, {"line", "text"} of captions, or
                            record indices of a data split
  STORE/tokens-00000.npy    (--tokens) float16 [m, N, d] FILIP token embeddings
  STORE/mask-00000.npy      (--tokens) bool [m, N]: the tokens late interaction scores

Every file is written under a temporary name and renamed; the ids file is the last of a
shard, so a shard with ids is complete and a rerun skips it.
"""
import json
import os

import numpy as np

from jaxret.errors import UserError

FORMAT = "jaxret-embeddings-1"
META = "store.json"
# The keys that make two stores the same plan; a rerun with different ones is refused.
PLAN_KEYS = ("model", "step", "kind", "source", "shard_size", "num_shards", "tokens")


def shard_file(store, what, i):
  ext = "json" if what == "ids" else "npy"
  return os.path.join(store, f"{what}-{i:05d}.{ext}")


def _replace(path, write):
  tmp = path + ".tmp"
  with open(tmp, "wb" if path.endswith(".npy") else "w") as f:
    write(f)
  os.replace(tmp, path)


def write_meta(store, meta):
  _replace(os.path.join(store, META), lambda f: json.dump(meta, f, indent=2))


def read_meta(store):
  path = os.path.join(store, META)
  if not os.path.isfile(path):
    raise UserError(f"'{store}' is not an embedding store (no {META}): build one with "
                    "`jaxret embed --model PATH --out STORE ...`")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise UserError(f"'{path}' has format {meta.get('format')!r}, expected '{FORMAT}': rebuild "
                    "the store with this version of jaxret")
  return meta


def begin(store, plan):
  """Creates the store or checks a partial one was planned the same; -> the meta dict."""
  os.makedirs(store, exist_ok=True)
  path = os.path.join(store, META)
  if os.path.isfile(path):
    old = read_meta(store)
    for key in PLAN_KEYS:
      if old.get(key) != plan.get(key):
        raise UserError(f"'{store}' holds a store built with {key}={old.get(key)!r}, not "
                        f"{plan.get(key)!r}: pass a new --out, or the arguments that began it")
    return old
  meta = {"format": FORMAT, **plan, "count": None, "complete": False}
  write_meta(store, meta)
  return meta


def shard_done(store, i):
  return os.path.isfile(shard_file(store, "ids", i))


def write_shard(store, i, ids, emb, tokens=None, mask=None):
  """One shard's files, ids last (see the module docstring)."""
  _replace(shard_file(store, "emb", i), lambda f: np.save(f, np.asarray(emb, np.float16)))
  if tokens is not None:
    _replace(shard_file(store, "tokens", i), lambda f: np.save(f, np.asarray(tokens, np.float16)))
    _replace(shard_file(store, "mask", i), lambda f: np.save(f, np.asarray(mask, bool)))
  _replace(shard_file(store, "ids", i), lambda f: json.dump(list(ids), f))


def finish(store, meta):
  """Marks the store complete once every shard is on disk; -> the meta dict."""
  count = 0
  for i in range(meta["num_shards"]):
    with open(shard_file(store, "ids", i)) as f:
      count += len(json.load(f))
  meta = {**meta, "count": count, "complete": True}
  write_meta(store, meta)
  return meta


class Store:
  """A complete store, opened: emb float16 [n, d] in memory, ids [n]; tokens and masks stay
  memory-mapped per shard (`token_rows` reads the rows a rerank needs)."""

  def __init__(self, path):
    self.path, self.meta = path, read_meta(path)
    if not self.meta.get("complete"):
      raise UserError(f"store '{path}' is incomplete (an interrupted `jaxret embed`): rerun the "
                      "same command to finish it")
    embs, self.ids, self.offsets = [], [], [0]
    for i in range(self.meta["num_shards"]):
      try:
        embs.append(np.load(shard_file(path, "emb", i)))
        with open(shard_file(path, "ids", i)) as f:
          self.ids += json.load(f)
      except FileNotFoundError as e:
        raise UserError(f"store '{path}' is missing {os.path.basename(e.filename)}: rerun the "
                        "`jaxret embed` command that built it") from None
      self.offsets.append(self.offsets[-1] + len(embs[-1]))
    self.emb = np.concatenate(embs) if embs else np.zeros((0, self.dim), np.float16)
    if len(self.emb) == 0:
      raise UserError(f"store '{path}' holds no embeddings")

  kind = property(lambda self: self.meta["kind"])
  dim = property(lambda self: self.meta["dim"])
  has_tokens = property(lambda self: bool(self.meta.get("tokens")))

  def __len__(self):
    return len(self.emb)

  def token_rows(self, rows):
    """(tokens float16 [r, N, d], mask bool [r, N]) of global rows `rows`."""
    if not self.has_tokens:
      raise UserError(f"store '{self.path}' has no token embeddings: rebuild it with "
                      "`jaxret embed ... --tokens` to rerank")
    shard = np.searchsorted(self.offsets, rows, side="right") - 1
    toks, masks = [], []
    for r, s in zip(rows, shard):
      t = np.load(shard_file(self.path, "tokens", s), mmap_mode="r")
      m = np.load(shard_file(self.path, "mask", s), mmap_mode="r")
      toks.append(np.asarray(t[r - self.offsets[s]]))
      masks.append(np.asarray(m[r - self.offsets[s]]))
    return np.stack(toks), np.stack(masks)

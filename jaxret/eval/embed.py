"""Embedding images and texts for evaluation with jitted, sharded model calls.

Every batch is padded to one shape (one compile), split over the mesh's batch axes (each
process contributing its rows), and the outputs are all-gathered so every process ends with
the same host arrays, in input order.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxret.parallel import partitioning
from jaxret.parallel.mesh import batch_parallelism

POOLED = {"image": ("image_emb",), "text": ("text_emb",)}
TOKENS = {"image": ("image_emb", "image_tokens", "image_mask", "image_special"),
          "text": ("text_emb", "text_tokens", "text_mask", "text_special")}


class Embedder:
  def __init__(self, model, mesh, param_shardings, batch_size, tokens=False,
               rules=partitioning.DEFAULT_RULES):
    n = batch_parallelism(mesh)
    self.batch_size = -(-batch_size // n) * n  # a multiple of the batch-parallel devices
    self.mesh, self.tokens, self.rules = mesh, tokens, rules
    keep = TOKENS if tokens else POOLED
    sh = partitioning.batch_sharding(mesh)

    def image_fn(params, image):
      out = model.apply({"params": params}, image, tokens=tokens, method="encode_image")
      return {k: out[k] for k in keep["image"] if k in out}

    def text_fn(params, text):
      out = model.apply({"params": params}, text, tokens=tokens, method="encode_text")
      return {k: out[k] for k in keep["text"] if k in out}

    self._fns = {kind: jax.jit(fn, in_shardings=(param_shardings, sh), out_shardings=sh)
                 for kind, fn in (("image", image_fn), ("text", text_fn))}

  def __call__(self, params, kind, array):
    """Embeds a host array of any length (images [n,H,W,3] or token ids [n,L])."""
    b = self.batch_size
    per_process = b // jax.process_count()
    lo = jax.process_index() * per_process
    sh = partitioning.batch_sharding(self.mesh)
    parts = []
    for start in range(0, len(array), b):
      chunk = np.asarray(array[start:start + b])
      n = len(chunk)
      chunk = np.pad(chunk, [(0, b - n)] + [(0, 0)] * (chunk.ndim - 1))
      x = jax.make_array_from_process_local_data(sh, chunk[lo:lo + per_process])
      with partitioning.activate(self.mesh, self.rules):
        out = self._fns[kind](params, x)
      if jax.process_count() > 1:
        out = multihost_utils.process_allgather(out, tiled=True)
      parts.append({k: np.asarray(v)[:n] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def concat(parts):
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}

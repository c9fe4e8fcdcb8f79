"""Image<->text retrieval on a held-out split of image-caption pairs (pair i <-> i).

Embeddings are computed with the training mesh (batch split over devices), gathered to the
host, scored, and ranked. Scoring follows what the loss trained: cosine of pooled embeddings,
or FILIP late interaction (image->text ranks by s^I, text->image by s^T).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxret.data.pipeline import eval_batches
from jaxret.losses.filip import filip_scores
from jaxret.parallel import partitioning
from jaxret.parallel.mesh import batch_parallelism


def ranks(scores):
  """Rank of the true match (the diagonal) per image row and per text column, 0 = best.

  Ties count against the model: rank = how many other candidates score >= the true one.
  `scores` may be one [N, N] array or a pair (i2t_scores, t2i_scores), both [images, texts].
  """
  i2t, t2i = scores if isinstance(scores, tuple) else (scores, scores)
  i2t_rank = (i2t >= np.diag(i2t)[:, None]).sum(axis=1) - 1
  t2i_rank = (t2i >= np.diag(t2i)[None, :]).sum(axis=0) - 1
  return i2t_rank, t2i_rank


def recall_at_k(scores, ks=(1, 5, 10)):
  i2t_rank, t2i_rank = ranks(scores)
  return {"i2t": {f"R@{k}": float(np.mean(i2t_rank < k)) for k in ks},
          "t2i": {f"R@{k}": float(np.mean(t2i_rank < k)) for k in ks}}


class RetrievalEvaluator:
  """Embeds a split once per call with jitted, sharded model calls and reports Recall@K."""

  def __init__(self, model, loss, mesh, param_shardings, *, data_dir, split, text_len,
               batch_size, ks=(1, 5, 10)):
    n = batch_parallelism(mesh)
    self.batch_size = -(-batch_size // n) * n  # a multiple of the batch-parallel devices
    self.mesh, self.loss, self.ks = mesh, loss, tuple(ks)
    self.data_dir, self.split, self.text_len = data_dir, split, text_len
    tokens = loss.similarity == "late_interaction"
    keep = (("image_tokens", "image_mask", "text_tokens", "text_mask") if tokens
            else ("image_emb", "text_emb"))

    def embed(params, image, text):
      out = model.apply({"params": params}, image, text, tokens=tokens)
      return {k: out[k] for k in keep}

    self._embed = jax.jit(embed, in_shardings=(param_shardings,
                                               partitioning.batch_sharding(mesh),
                                               partitioning.batch_sharding(mesh)),
                          out_shardings=partitioning.batch_sharding(mesh))
    self._late = jax.jit(filip_scores)

  def embed_split(self, params):
    """-> dict of host numpy arrays over the whole split, in record order."""
    parts = []
    sh = partitioning.batch_sharding(self.mesh)
    per_process = self.batch_size // jax.process_count()
    lo = jax.process_index() * per_process
    for batch in eval_batches(self.data_dir, batch_size=self.batch_size,
                              text_len=self.text_len, split=self.split):
      n = len(batch["text"])
      pad = self.batch_size - n  # the last batch is padded to keep one compiled shape
      arrays = [np.pad(batch[k], [(0, pad)] + [(0, 0)] * (batch[k].ndim - 1))
                for k in ("image", "text")]
      image, text = (jax.make_array_from_process_local_data(sh, a[lo:lo + per_process])
                     for a in arrays)
      with partitioning.activate(self.mesh):
        out = self._embed(params, image, text)
      out = multihost_utils.process_allgather(out, tiled=True)
      parts.append({k: np.asarray(v)[:n] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def scores(self, emb, block=64):
    if self.loss.similarity == "pooled":
      return emb["image_emb"] @ emb["text_emb"].T
    # Late interaction, a block of images against all texts at a time to bound memory.
    i2t, t2i = [], []
    for lo in range(0, len(emb["image_tokens"]), block):
      s = self._late(jnp.asarray(emb["image_tokens"][lo:lo + block]),
                     jnp.asarray(emb["image_mask"][lo:lo + block]),
                     jnp.asarray(emb["text_tokens"]), jnp.asarray(emb["text_mask"]))
      i2t.append(np.asarray(s[0]))
      t2i.append(np.asarray(s[1]))
    return np.concatenate(i2t), np.concatenate(t2i)

  def __call__(self, params, step):
    emb = self.embed_split(params)
    n = len(next(iter(emb.values())))
    result = recall_at_k(self.scores(emb), self.ks)
    return {"step": int(step), "split": self.split, "num_pairs": int(n),
            "similarity": self.loss.similarity, **result}


def format_table(result, title=None):
  """A small fixed-width table of Recall@K in percent."""
  keys = list(result["i2t"])
  title = title or (f"retrieval on '{result['split']}' at step {result['step']}: "
                    f"{result['num_pairs']} pairs, {result['similarity']} scores, "
                    f"chance R@1 = {100 / result['num_pairs']:.2f}%")
  lines = [title, f"{'direction':<13}" + "".join(f"{k:>8}" for k in keys)]
  for name, d in (("image->text", "i2t"), ("text->image", "t2i")):
    lines.append(f"{name:<13}" + "".join(f"{100 * result[d][k]:>7.1f}%" for k in keys))
  return "\n".join(lines)


def write_result(workdir, result):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=2)

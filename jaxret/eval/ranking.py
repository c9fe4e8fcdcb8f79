"""Exact ranks of the true matches, computed in query blocks so memory stays bounded.

A retrieval direction is queries against a gallery. Gallery item g belongs to `owner[g]`;
query q's matches are the gallery items with owner == key[q] (text->image: one image;
image->text: all of the image's captions, COCO-style "any caption counts"). The rank of a
query is the number of non-matching gallery items scoring >= its best match (0 = best;
ties count against the model). Scores may be transformed per gallery item before ranking
(hubness corrections): s' = a * s - offset[g] for queries whose `active` flag is set.

Each block of queries is scored against the whole gallery on the devices: the block is
split over the mesh's batch axes, the gallery is replicated, so one device holds
(block / devices) x gallery scores. Every process holds the same host arrays (embeddings
are all-gathered after embedding), so the arrays are laid out with make_array_from_callback.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxret.parallel.mesh import BATCH_AXES, batch_parallelism

# Scores held per block: rows x gallery floats (2^24 floats = 64 MiB).
DEFAULT_BLOCK_ELEMENTS = 1 << 24


def rank_dense(scores, key, owner):
  """Brute-force reference ranks from a full [queries, gallery] score matrix (numpy)."""
  scores = np.asarray(scores)
  match = np.asarray(owner)[None, :] == np.asarray(key)[:, None]
  best = np.where(match, scores, -np.inf).max(axis=1)
  return ((scores >= best[:, None]) & ~match).sum(axis=1)


def metrics(ranks, ks=(1, 5, 10)):
  """Recall@K (fractions) and 1-based mean/median rank from 0-based ranks."""
  ranks = np.asarray(ranks)
  out = {f"R@{k}": float(np.mean(ranks < k)) for k in ks}
  out["mean_rank"] = float(np.mean(ranks) + 1)
  out["median_rank"] = float(np.median(ranks) + 1)
  return out


def rsum(i2t, t2i, ks=(1, 5, 10)):
  """The usual COCO/Flickr summary: R@1 + R@5 + R@10 of both directions, in percent."""
  return float(100 * sum(d[f"R@{k}"] for d in (i2t, t2i) for k in ks if f"R@{k}" in d))


def _global(mesh, array, spec):
  array = np.asarray(array)
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def _to_host(x):
  if jax.process_count() > 1:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def _block_rows(gallery_size, devices, block_elements):
  rows = max(devices, block_elements // max(gallery_size, 1))
  return -(-rows // devices) * devices


@functools.partial(jax.jit, static_argnames=("score_fn",))
def _rank_block(queries, key, active, gallery, owner, offset, a, score_fn):
  s = score_fn(queries, gallery)  # [b, G]
  # The hubness activation test (QB-Norm's dynamic inverted softmax) uses the raw top-1.
  top1 = jnp.argmax(s, axis=1)
  use = active[top1] & (a > 0)
  s = jnp.where(use[:, None], a * s - offset[None, :], s)
  match = owner[None, :] == key[:, None]
  best = jnp.max(jnp.where(match, s, -jnp.inf), axis=1)
  return jnp.sum((s >= best[:, None]) & ~match, axis=1, dtype=jnp.int32)


def dot_scores(queries, gallery):
  return jnp.einsum("qd,gd->qg", queries, gallery, preferred_element_type=jnp.float32)


class Ranker:
  """Blocked, sharded exact ranking on a mesh (see the module docstring)."""

  def __init__(self, mesh, block_elements=DEFAULT_BLOCK_ELEMENTS):
    self.mesh, self.block_elements = mesh, block_elements
    self.devices = batch_parallelism(mesh)

  def ranks(self, queries, key, gallery, owner, *, a=0.0, offset=None, active=None,
            score_fn=dot_scores):
    """0-based ranks [Q]. a > 0 applies s' = a*s - offset[g] to queries whose raw top-1
    gallery item has active[g] (default: every item)."""
    q, G = len(queries), len(gallery)
    offset = np.zeros(G, np.float32) if offset is None else np.asarray(offset, np.float32)
    active = np.ones(G, bool) if active is None else np.asarray(active, bool)
    rep = P()
    gallery_args = [_global(self.mesh, x, rep) for x in
                    (gallery, np.asarray(owner, np.int32), offset)]
    active_g = _global(self.mesh, active, rep)
    rows = _block_rows(G, self.devices, self.block_elements)
    out = []
    for lo in range(0, q, rows):
      hi = min(q, lo + rows)
      pad = rows - (hi - lo)  # pad the last block: one compiled shape
      qb = np.pad(np.asarray(queries[lo:hi]), [(0, pad)] + [(0, 0)] * (queries.ndim - 1))
      kb = np.pad(np.asarray(key[lo:hi], np.int32), (0, pad), constant_values=-1)
      r = _rank_block(_global(self.mesh, qb, P(BATCH_AXES)), _global(self.mesh, kb, P(BATCH_AXES)),
                      active_g, gallery_args[0], gallery_args[1], gallery_args[2],
                      jnp.float32(a), score_fn=score_fn)
      out.append(_to_host(r)[:hi - lo])
    return np.concatenate(out) if out else np.zeros(0, np.int32)

  def top_k(self, queries, gallery, k, score_fn=dot_scores):
    """(scores, indices) [Q, k] of each query's k best gallery items (ties: lower index)."""
    rows = _block_rows(len(gallery), self.devices, self.block_elements)
    g = _global(self.mesh, gallery, P())
    vals, idx = [], []
    for lo in range(0, len(queries), rows):
      hi = min(len(queries), lo + rows)
      qb = np.pad(np.asarray(queries[lo:hi]), [(0, rows - (hi - lo))] + [(0, 0)] * (queries.ndim - 1))
      v, i = _top_k_block(_global(self.mesh, qb, P(BATCH_AXES)), g, k=k, score_fn=score_fn)
      vals.append(_to_host(v)[:hi - lo])
      idx.append(_to_host(i)[:hi - lo])
    return np.concatenate(vals), np.concatenate(idx)

  def logsumexp_over_queries(self, queries, gallery, beta):
    """[G]: log sum_q exp(beta * s(q, g)) over a bank of queries, in blocks (hubness)."""
    rows = _block_rows(len(gallery), self.devices, self.block_elements)
    g = _global(self.mesh, gallery, P())
    total = np.full(len(gallery), -np.inf)
    for lo in range(0, len(queries), rows):
      hi = min(len(queries), lo + rows)
      qb = np.pad(np.asarray(queries[lo:hi]), [(0, rows - (hi - lo))] + [(0, 0)] * (queries.ndim - 1))
      valid = np.arange(rows) < hi - lo
      part = _to_host(_lse_block(_global(self.mesh, qb, P(BATCH_AXES)),
                                 _global(self.mesh, valid, P(BATCH_AXES)), g, jnp.float32(beta)))
      total = np.logaddexp(total, part)
    return total


@functools.partial(jax.jit, static_argnames=("k", "score_fn"))
def _top_k_block(queries, gallery, k, score_fn):
  return jax.lax.top_k(score_fn(queries, gallery), k)


@jax.jit
def _lse_block(queries, valid, gallery, beta):
  s = beta * dot_scores(queries, gallery)
  return jax.nn.logsumexp(jnp.where(valid[:, None], s, -jnp.inf), axis=0)

"""FILIP late-interaction retrieval: exact token-wise scores, or two-stage rerank.

Exact: s^I (image->text) and s^T (text->image) for every image-caption pair, in tiles of
images x captions so one tile of token similarities is alive at a time; for small
galleries (images x captions <= eval.filip_exact_max_pairs).
Two-stage: each query's top-k gallery items by pooled cosine, rescored by late
interaction, reordered; items outside the candidates keep their pooled order after them.
A query whose matches all fall outside its candidates keeps its pooled rank (>= k).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxret.losses.filip import filip_scores


@jax.jit
def _tile(image_tokens, image_mask, text_tokens, text_mask):
  return filip_scores(image_tokens, image_mask, text_tokens, text_mask)


def exact_scores(image_tokens, image_mask, text_tokens, text_mask, *, tile_elements=1 << 22):
  """(s^I, s^T) [images, captions] on the host, tile by tile (tiles hold <= tile_elements
  token similarities)."""
  n, ni = image_tokens.shape[:2]
  t, nt = text_tokens.shape[:2]
  bt = max(1, min(t, tile_elements // (ni * nt * 8)))
  bi = max(1, min(n, tile_elements // (ni * nt * bt)))
  s_i, s_t = np.zeros((n, t), np.float32), np.zeros((n, t), np.float32)
  for lo in range(0, n, bi):
    for co in range(0, t, bt):
      a, b = _tile(image_tokens[lo:lo + bi], image_mask[lo:lo + bi],
                   text_tokens[co:co + bt], text_mask[co:co + bt])
      s_i[lo:lo + bi, co:co + bt] = np.asarray(a)
      s_t[lo:lo + bi, co:co + bt] = np.asarray(b)
  return s_i, s_t


@jax.jit
def candidate_scores(q_tokens, q_mask, c_tokens, c_mask):
  """Late interaction of each query with its own candidates: mean over the query's valid
  tokens of the max over the candidate's valid tokens. [b,Nq,d], [b,k,Nc,d] -> [b,k].
  Image queries give FILIP's s^I, caption queries s^T."""
  sim = jnp.einsum("bqd,bkcd->bkqc", q_tokens, c_tokens, preferred_element_type=jnp.float32)
  best = jnp.max(jnp.where(c_mask[:, :, None, :], sim, -jnp.inf), axis=3)  # [b, k, q]
  q_mask = q_mask[:, None, :]
  return jnp.sum(jnp.where(q_mask, best, 0), axis=2) / jnp.sum(q_mask, axis=2)


def rerank_scores(q_tokens, q_mask, g_tokens, g_mask, candidates, *, block=64):
  """[Q, k] late-interaction scores of each query's candidate gallery items."""
  out = []
  for lo in range(0, len(candidates), block):
    idx = candidates[lo:lo + block]
    out.append(np.asarray(candidate_scores(q_tokens[lo:lo + block], q_mask[lo:lo + block],
                                           g_tokens[idx], g_mask[idx])))
  return np.concatenate(out)


def two_stage_ranks(candidates, scores, key, owner, pooled_ranks):
  """0-based ranks after reranking: [Q, k] candidate indices and their new scores; queries
  with no match among their candidates keep `pooled_ranks`."""
  match = np.asarray(owner)[candidates] == np.asarray(key)[:, None]
  best = np.where(match, scores, -np.inf).max(axis=1)
  reranked = ((scores >= best[:, None]) & ~match).sum(axis=1)
  return np.where(match.any(axis=1), reranked, pooled_ranks)

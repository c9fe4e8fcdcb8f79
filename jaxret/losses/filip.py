"""FILIP loss (Yao 2021, §3.1): token-wise late interaction, then symmetric InfoNCE.

s^I_ij = mean over valid image tokens k of max over valid text tokens r of <v_ik, t_jr>
s^T_ij = mean over valid text tokens r of max over valid image tokens k of <v_ik, t_jr>
Padding (mask 0) takes part in neither the max nor the mean. Every example needs at
least one valid token (a caption always has its start/end token), else its scores are -inf.

The kernel never builds more than one tile of the token-similarity tensor: scores are
made for tiles of `chunk` images x `chunk` texts, each under `jax.checkpoint`, so peak
memory is set by the tile and the b x b (ring) or b x B (all_gather) score matrices,
not by B x B x Ni x Nt. Only texts are communicated (in `comm_dtype`); optionally only
the top `token_fraction` of each example's tokens, by the paper's criterion, take part.

Hard negatives (NegCLIP-style): k extra captions per example, [B, k, Nt, d] tokens with their
masks, join the image->text side (s^I) as columns that are never positive; the text->image side
is unchanged. They travel with their examples' texts and go through token selection with them.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxret.losses import common, ring

IMPLS = ("all_gather", "ring")


def filip_reference(image_tokens, image_mask, text_tokens, text_mask, scale, neg_tokens=None,
                    neg_mask=None):
  """Full-batch FILIP loss from the whole [B, B, Ni, Nt] token-similarity tensor; hard
  negatives `neg_tokens` [B, k, Nt, d] (mask [B, k, Nt]) extend the image->text rows."""
  s_image, s_text = _reference_scores(image_tokens, image_mask, text_tokens, text_mask)
  rows = scale * s_image
  if neg_tokens is not None:
    negs, _ = _reference_scores(image_tokens, image_mask, common.flat(neg_tokens),
                                common.flat(neg_mask))
    rows = jnp.concatenate([rows, scale * negs], axis=1)
  image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(rows, axis=1)))
  text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(scale * s_text.T, axis=1)))
  return (image_to_text + text_to_image) / 2


def _reference_scores(image_tokens, image_mask, text_tokens, text_mask):
  """(s^I, s^T) [B images, n texts] straight from the definition, one [B, n, Ni, Nt] tensor."""
  image_valid = jnp.asarray(image_mask).astype(bool)[:, None, :]  # [i, 1, k]
  text_valid = jnp.asarray(text_mask).astype(bool)[None, :, :]  # [1, j, r]
  sim = jnp.einsum("ikd,jrd->ijkr", image_tokens, text_tokens)
  best_text = jnp.max(jnp.where(text_valid[:, :, None, :], sim, -jnp.inf), axis=3)  # [i, j, k]
  best_image = jnp.max(jnp.where(image_valid[:, :, :, None], sim, -jnp.inf), axis=2)  # [i, j, r]
  s_image = jnp.sum(jnp.where(image_valid, best_text, 0), axis=2) / jnp.sum(image_valid, axis=2)
  s_text = jnp.sum(jnp.where(text_valid, best_image, 0), axis=2) / jnp.sum(text_valid, axis=2)
  return s_image, s_text


def _token_similarities(image_tokens, text_tokens):
  """[Bi, Ni, d] x [Bt, Nt, d] -> [Bi, Ni, Bt, Nt]: dot_general's own output order, so the
  big tensor is reduced where it lands instead of being transposed (a second copy)."""
  return jnp.einsum("ikd,jrd->ikjr", image_tokens, text_tokens, preferred_element_type=jnp.float32)


def _masked_mean(x, valid, axis):
  return jnp.sum(jnp.where(valid, x, 0), axis=axis) / jnp.sum(valid, axis=axis)


def _image_scores(sim, image_mask, text_mask):
  """s^I [Bi, Bt]: each valid image token's best valid text token, averaged."""
  best_text = jnp.max(jnp.where(text_mask[None, None], sim, -jnp.inf), axis=3)  # [i, k, j]
  return _masked_mean(best_text, image_mask[:, :, None], axis=1)


def _text_scores(sim, image_mask, text_mask):
  """s^T [Bi, Bt]: each valid text token's best valid image token, averaged."""
  best_image = jnp.max(jnp.where(image_mask[:, :, None, None], sim, -jnp.inf), axis=1)  # [i, j, r]
  return _masked_mean(best_image, text_mask[None], axis=2)


def filip_scores(image_tokens, image_mask, text_tokens, text_mask):
  """(s^I, s^T), both laid out [image, text], for retrieval eval; one token tensor."""
  image_mask = jnp.asarray(image_mask).astype(bool)
  text_mask = jnp.asarray(text_mask).astype(bool)
  sim = _token_similarities(image_tokens, text_tokens)
  return _image_scores(sim, image_mask, text_mask), _text_scores(sim, image_mask, text_mask)


def _divisor(n, chunk):
  """The largest tile size <= chunk that divides n (chunk 0: no split)."""
  if chunk <= 0 or chunk >= n:
    return n
  return max(c for c in range(1, chunk + 1) if n % c == 0)


def _tiled(tile, images, image_mask, texts, text_mask, chunk):
  """tile(images, image_mask, texts, text_mask) on every (image chunk, text chunk) pair:
  outputs stacked [m / ci, n / ct, ...]. Each row of tiles is rematerialised as a whole
  and each tile inside it again, so the backward pass holds one tile's similarities."""
  m, n = images.shape[0], texts.shape[0]
  ci, ct = _divisor(m, chunk), _divisor(n, chunk)
  split = lambda x, c: x.reshape(x.shape[0] // c, c, *x.shape[1:])
  text_tiles = (split(texts, ct), split(text_mask, ct))
  tile = jax.checkpoint(tile)

  @jax.checkpoint
  def row(chunk_images):
    return jax.lax.map(lambda t: tile(*chunk_images, *t), text_tiles)

  return jax.lax.map(row, (split(images, ci), split(image_mask, ci)))


def _score_tile(images, image_mask, texts, text_mask):
  sim = _token_similarities(images.astype(jnp.float32), texts.astype(jnp.float32))
  return _image_scores(sim, image_mask, text_mask), _text_scores(sim, image_mask, text_mask)


def block_scores(images, image_mask, texts, text_mask, chunk=0):
  """(s^I, s^T) [m, n] like `filip_scores`, built tile by tile (see `_tiled`)."""
  m, n = images.shape[0], texts.shape[0]
  tiles = _tiled(_score_tile, images, image_mask, texts, text_mask, chunk)  # [m/ci, n/ct, ci, ct]
  return tuple(t.transpose(0, 2, 1, 3).reshape(m, n) for t in tiles)


def pair_scores(images, image_mask, texts, text_mask):
  """(s^I_ii, s^T_ii) [b] for matched pairs only: the positives."""
  sim = jnp.einsum("ikd,ird->ikr", images.astype(jnp.float32), texts.astype(jnp.float32),
                   preferred_element_type=jnp.float32)
  best_text = jnp.max(jnp.where(text_mask[:, None, :], sim, -jnp.inf), axis=2)  # [i, k]
  best_image = jnp.max(jnp.where(image_mask[:, :, None], sim, -jnp.inf), axis=1)  # [i, r]
  return _masked_mean(best_text, image_mask, axis=1), _masked_mean(best_image, text_mask, axis=1)


# ----------------------------------------------------------------------------------------
# Token selection (FILIP §3.1.2): before communication, keep each example's tokens with
# the highest max similarity against all valid tokens of the other side in the local batch.


def _best_tile(images, image_mask, texts, text_mask):
  sim = _token_similarities(images, texts)  # [i, k, j, r]
  image_best = jnp.max(jnp.where(text_mask[None, None], sim, -jnp.inf), axis=(2, 3))  # [i, k]
  text_best = jnp.max(jnp.where(image_mask[:, :, None, None], sim, -jnp.inf), axis=(0, 1))  # [j, r]
  return image_best, text_best


def token_criterion(images, image_mask, texts, text_mask, chunk=0):
  """Each image token's max similarity to any valid text token of the batch, and each text
  token's to any valid image token: [m, Ni], [n, Nt] (tiled like `block_scores`)."""
  image_best, text_best = _tiled(_best_tile, images, image_mask, texts, text_mask, chunk)
  image_best = jnp.max(image_best, axis=1).reshape(images.shape[:2])  # over text tiles
  text_best = jnp.max(text_best, axis=0).reshape(texts.shape[:2])  # over image tiles
  return image_best, text_best


def keep_count(num_tokens, fraction):
  return max(1, math.ceil(fraction * num_tokens))


def _keep_top(tokens, mask, criterion, fraction):
  """Each example's top ceil(fraction * N) valid tokens (ties: lower position first)."""
  keep = keep_count(tokens.shape[1], fraction)
  _, idx = jax.lax.top_k(jnp.where(mask, criterion, -jnp.inf), keep)  # [b, keep]
  return (jnp.take_along_axis(tokens, idx[:, :, None], axis=1),
          jnp.take_along_axis(mask, idx, axis=1))


def select_tokens(images, image_mask, texts, text_mask, fraction, chunk=0):
  """(images, image_mask, texts, text_mask) reduced to each example's top `fraction` tokens
  by the local-batch criterion; padding is never preferred to a valid token and stays masked."""
  if fraction >= 1:
    return images, image_mask, texts, text_mask
  image_best, text_best = jax.lax.stop_gradient(
      token_criterion(images, image_mask, texts, text_mask, chunk))
  return (*_keep_top(images, image_mask, image_best, fraction),
          *_keep_top(texts, text_mask, text_best, fraction))


def drop_special(mask, special):
  """`mask` without the special (cls / end) tokens, except in rows that would be left empty."""
  mask = jnp.asarray(mask).astype(bool)
  dropped = mask & ~jnp.asarray(special).astype(bool)
  return jnp.where(jnp.any(dropped, axis=1, keepdims=True), dropped, mask)


# ----------------------------------------------------------------------------------------
# The sharded kernel.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather_as(x, axes, dtype):
  """all_gather of `x` sent as `dtype`, received as x.dtype; the gradient is reduce-scattered
  at full precision (so a half-precision wire rounds the features, never the gradients)."""
  return common.gather(x.astype(dtype), axes).astype(x.dtype)


def _gather_as_fwd(x, axes, dtype):
  return _gather_as(x, axes, dtype), None


def _gather_as_bwd(axes, dtype, _, g):
  return (jax.lax.psum_scatter(g, axes, tiled=True),)


_gather_as.defvjp(_gather_as_fwd, _gather_as_bwd)


def filip_loss(image_tokens, image_mask, text_tokens, text_mask, scale, *, mesh,
               axes=common.DEFAULT_AXES, impl="all_gather", token_fraction=1.0, comm_dtype=None,
               chunk=0, moves="auto", negatives=None):
  """`filip_reference` on global arrays whose batch is split over mesh `axes`.

  impl "all_gather": local images against the gathered texts (scores b x B); "ring": texts
  travel round the ring (`ring.lse_sum`, scores b x b). Both score each image-text pair
  once for both directions, in tiles of `chunk` x `chunk` examples (0: one tile per block).
  token_fraction < 1 keeps only each example's top tokens (chosen on each device against its
  local batch, so the result depends on the sharding, as in the paper); comm_dtype (e.g.
  jnp.bfloat16) is the dtype texts are sent in, scores are accumulated in fp32. `moves`: how
  the ring's texts travel (common.Ring). `negatives`: (tokens [B, k, Nt, d], mask [B, k, Nt]).
  """
  axes = common.batch_axes(mesh, axes)
  extra = () if negatives is None else (negatives[0], jnp.asarray(negatives[1]).astype(bool))
  batch = common.global_batch(mesh, axes, image_tokens=image_tokens, image_mask=image_mask,
                              text_tokens=text_tokens, text_mask=text_mask,
                              **dict(zip(("neg_tokens", "neg_mask"), extra)))
  size = common.ring_size(mesh, axes)
  wire = jnp.dtype(comm_dtype or text_tokens.dtype)

  def local(images, image_mask, texts, text_mask, scale, *negs):
    b = texts.shape[0]
    if negs:  # negatives after the real texts: selected, sent and scored with them
      texts = jnp.concatenate([texts, common.flat(negs[0])])
      text_mask = jnp.concatenate([text_mask, common.flat(negs[1])])
    images, image_mask, texts, text_mask = select_tokens(images, image_mask, texts, text_mask,
                                                         token_fraction, chunk)
    scale = common.varying(scale, axes)
    # The positives use the texts as they would arrive over the wire.
    sent = texts + jax.lax.stop_gradient(texts.astype(wire).astype(texts.dtype) - texts)
    pos_image, pos_text = pair_scores(images, image_mask, sent[:b], text_mask[:b])
    positives = scale * (jnp.sum(pos_image) + jnp.sum(pos_text))
    if impl == "ring":
      normalisers = ring.lse_sum(_ring_block(chunk), axes, size, wire, moves, images, image_mask,
                                 texts, text_mask, scale)
    else:
      normalisers = _gathered_normalisers(images, image_mask, texts, text_mask, scale, axes, wire,
                                          chunk)
    return jax.lax.psum(normalisers - positives, axes) / (2 * batch)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axes),) * 4 + (P(),) + (P(axes),) * len(extra),
                          out_specs=P())
  return sharded(image_tokens, jnp.asarray(image_mask).astype(bool), text_tokens,
                 jnp.asarray(text_mask).astype(bool), common.as_scalar(scale), *extra)


def _ring_block(chunk):
  def block(images, image_mask, texts, text_mask, scale):
    s_image, s_text = block_scores(images, image_mask, texts, text_mask, chunk)
    # Rows over every travelling text (negatives after the b real ones), columns over the real.
    return scale * s_image, scale * s_text[:, :images.shape[0]]
  return block


def _gathered_normalisers(images, image_mask, texts, text_mask, scale, axes, wire, chunk):
  """Row log-sum-exps of s^I for local images plus column log-sum-exps of s^T for local texts.

  s^T columns need all images: each device reduces its own rows to a [B] partial lse,
  the partials are gathered ([D, B], small) and each device keeps its texts' slice.
  """
  b = images.shape[0]  # texts: b real ones, then any negatives (their s^T is not used)
  all_texts = _gather_as(texts, axes, wire)  # device-major: [real, negatives] per device
  s_image, s_text = block_scores(images, image_mask, all_texts, common.gather(text_mask, axes),
                                 chunk)  # [b, n] each
  rows = jnp.sum(jax.nn.logsumexp(scale * s_image, axis=1))
  per_device = texts.shape[0]
  s_text = s_text.reshape(b, -1, per_device)[:, :, :b].reshape(b, -1)  # real texts: [b, B]
  partial = jax.nn.logsumexp(scale * s_text, axis=0)  # [B], over this device's images
  columns = jax.nn.logsumexp(jax.lax.all_gather(partial, axes), axis=0)  # [B], over all images
  own = jax.lax.dynamic_slice_in_dim(columns, jax.lax.axis_index(axes) * b, b)
  return rows + jnp.sum(own)

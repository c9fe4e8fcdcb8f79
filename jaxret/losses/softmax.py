"""CLIP loss (Radford 2021): symmetric InfoNCE over image->text and text->image.

Hard negatives (NegCLIP, Yuksekgonul 2023): `negatives` [B, k, d] are k extra captions per
example that join the image->text softmax as columns that are never positive (every image
sees all B*k of them); the text->image side is unchanged (a negative caption has no image).
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxret.losses import common, ring


def softmax_reference(image_emb, text_emb, scale, negatives=None):
  """Full-batch CLIP loss; `scale` is the logit multiplier (exp of the learnt log-scale)."""
  logits = scale * image_emb @ text_emb.T  # [B images, B texts]
  rows = logits
  if negatives is not None:
    rows = jnp.concatenate([logits, scale * image_emb @ common.flat(negatives).T], axis=1)
  image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(rows, axis=1)))
  text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  return (image_to_text + text_to_image) / 2


IMPLS = ("all_gather", "ring")


def softmax_loss(image_emb, text_emb, scale, *, mesh, axes=common.DEFAULT_AXES, impl="all_gather",
                 moves="auto", negatives=None):
  """`softmax_reference` on global arrays whose batch is split over mesh `axes`.

  impl "all_gather": local rows against the gathered batch, memory b x B (the gather's
  transpose, a reduce-scatter, carries the gradients back). "ring": `ring.lse_sum`,
  memory b x b, each block scored once for both directions; `moves`: how texts travel
  (common.Ring). `negatives` [B, k, d] travel with their examples' texts.
  """
  axes = common.batch_axes(mesh, axes)
  batch = common.global_batch(mesh, axes, image_emb=image_emb, text_emb=text_emb,
                              **({} if negatives is None else {"negatives": negatives}))
  if impl == "ring":
    return _ring(image_emb, text_emb, scale, negatives, mesh, axes, batch, moves)

  def local(images, texts, scale, *negs):
    labels = common.positive_columns(images.shape[0], axes)
    image_rows = scale * common.dot(images, common.gather(texts, axes))  # [b, B]
    if negs:
      image_rows = jnp.concatenate(
          [image_rows, scale * common.dot(images, common.gather(common.flat(negs[0]), axes))], 1)
    text_rows = scale * common.dot(texts, common.gather(images, axes))  # [b, B]
    total = common.cross_entropy_sum(image_rows, labels) + common.cross_entropy_sum(text_rows, labels)
    return jax.lax.psum(total, axes) / (2 * batch)

  extra = () if negatives is None else (negatives,)
  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()) + (P(axes),) * len(extra),
                          out_specs=P())
  return sharded(image_emb, text_emb, common.as_scalar(scale), *extra)


def _block(images, _, texts, __, scale):
  """Image rows over every travelling text (negatives included, after the b real ones);
  text columns over the real texts only."""
  logits = scale * common.dot(images, texts)
  return logits, logits[:, :images.shape[0]]


def _ring(image_emb, text_emb, scale, negatives, mesh, axes, batch, moves):
  size = common.ring_size(mesh, axes)

  def local(images, texts, scale, *negs):
    scale = common.varying(scale, axes)
    wire = jnp.concatenate([texts, common.flat(negs[0])]) if negs else texts
    normalisers = ring.lse_sum(_block, axes, size, None, moves, images, None, wire, None, scale)
    positives = scale * jnp.sum(images * texts, axis=1)  # the diagonal of the own block
    return jax.lax.psum(normalisers - 2 * jnp.sum(positives), axes) / (2 * batch)

  extra = () if negatives is None else (negatives,)
  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()) + (P(axes),) * len(extra),
                          out_specs=P())
  return sharded(image_emb, text_emb, common.as_scalar(scale), *extra)

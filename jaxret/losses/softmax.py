"""CLIP loss (Radford 2021): symmetric InfoNCE over image->text and text->image."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxret.losses import common


def softmax_reference(image_emb, text_emb, scale):
  """Full-batch CLIP loss; `scale` is the logit multiplier (exp of the learnt log-scale)."""
  logits = scale * image_emb @ text_emb.T  # [B images, B texts]
  image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
  text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  return (image_to_text + text_to_image) / 2


def softmax_loss(image_emb, text_emb, scale, *, mesh, axes=common.DEFAULT_AXES):
  """`softmax_reference` on global arrays whose batch is split over mesh `axes`; memory b x B."""
  axes = common.batch_axes(mesh, axes)
  batch = common.global_batch(mesh, axes, image_emb=image_emb, text_emb=text_emb)

  def local(images, texts, scale):
    labels = common.positive_columns(images.shape[0], axes)
    image_rows = scale * common.dot(images, common.gather(texts, axes))  # [b, B]
    text_rows = scale * common.dot(texts, common.gather(images, axes))  # [b, B]
    total = common.cross_entropy_sum(image_rows, labels) + common.cross_entropy_sum(text_rows, labels)
    return jax.lax.psum(total, axes) / (2 * batch)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P())
  return sharded(image_emb, text_emb, common.as_scalar(scale))

"""SigLIP loss (Zhai 2023): independent binary log-loss on every image-text pair."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxret.losses import common


def sigmoid_reference(image_emb, text_emb, scale, bias):
  """Full-batch SigLIP loss: -sum_ij log sigmoid(z_ij (scale <x_i,y_j> + bias)) / B."""
  batch = image_emb.shape[0]
  logits = scale * image_emb @ text_emb.T + bias
  signs = 2 * jnp.eye(batch) - 1  # +1 for matched pairs, -1 for all others
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / batch


def sigmoid_loss(image_emb, text_emb, scale, bias, *, mesh, axes=common.DEFAULT_AXES):
  """`sigmoid_reference` on global arrays whose batch is split over mesh `axes`; memory b x B.

  The loss is one sum over all B x B pairs, so local image rows against all texts
  already cover every pair once: only the texts are gathered. (The paper's ring of
  collective permutes, memory b x b, is a later refinement of the same sum.)
  """
  axes = common.batch_axes(mesh, axes)
  batch = common.global_batch(mesh, axes, image_emb=image_emb, text_emb=text_emb)

  def local(images, texts, scale, bias):
    labels = common.positive_columns(images.shape[0], axes)
    logits = scale * common.dot(images, common.gather(texts, axes)) + bias  # [b, B]
    signs = jnp.where(jnp.arange(batch)[None, :] == labels[:, None], 1.0, -1.0)
    total = -jnp.sum(jax.nn.log_sigmoid(signs * logits))
    return jax.lax.psum(total, axes) / batch

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=P())
  return sharded(image_emb, text_emb, common.as_scalar(scale), common.as_scalar(bias))

"""FILIP loss (Yao 2021, §3.1): token-wise late interaction, then symmetric InfoNCE.

s^I_ij = mean over valid image tokens k of max over valid text tokens r of <v_ik, t_jr>
s^T_ij = mean over valid text tokens r of max over valid image tokens k of <v_ik, t_jr>
Padding (mask 0) takes part in neither the max nor the mean. Every example needs at
least one valid token (a caption always has its start/end token), else its scores are -inf.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxret.losses import common


def filip_reference(image_tokens, image_mask, text_tokens, text_mask, scale):
  """Full-batch FILIP loss from the whole [B, B, Ni, Nt] token-similarity tensor."""
  image_valid = jnp.asarray(image_mask).astype(bool)[:, None, :]  # [i, 1, k]
  text_valid = jnp.asarray(text_mask).astype(bool)[None, :, :]  # [1, j, r]
  sim = jnp.einsum("ikd,jrd->ijkr", image_tokens, text_tokens)
  best_text = jnp.max(jnp.where(text_valid[:, :, None, :], sim, -jnp.inf), axis=3)  # [i, j, k]
  best_image = jnp.max(jnp.where(image_valid[:, :, :, None], sim, -jnp.inf), axis=2)  # [i, j, r]
  s_image = jnp.sum(jnp.where(image_valid, best_text, 0), axis=2) / jnp.sum(image_valid, axis=2)
  s_text = jnp.sum(jnp.where(text_valid, best_image, 0), axis=2) / jnp.sum(text_valid, axis=2)
  image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(scale * s_image, axis=1)))
  text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(scale * s_text.T, axis=1)))
  return (image_to_text + text_to_image) / 2


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


# Rematerialised: the backward pass recomputes each [b, B, Ni, Nt] block when it needs it
# instead of keeping both (or their max masks) as residuals from the forward pass.
@jax.checkpoint
def _local_image_scores(images, image_mask, texts, text_mask):
  return _image_scores(_token_similarities(images, texts), image_mask, text_mask)


@jax.checkpoint
def _local_text_scores(images, image_mask, texts, text_mask):
  return _text_scores(_token_similarities(images, texts), image_mask, text_mask)


def filip_loss(image_tokens, image_mask, text_tokens, text_mask, scale, *, mesh,
               axes=common.DEFAULT_AXES):
  """`filip_reference` on global arrays whose batch is split over mesh `axes`; memory b x B x Ni x Nt."""
  axes = common.batch_axes(mesh, axes)
  batch = common.global_batch(mesh, axes, image_tokens=image_tokens, image_mask=image_mask,
                              text_tokens=text_tokens, text_mask=text_mask)

  def local(images, image_mask, texts, text_mask, scale):
    labels = common.positive_columns(images.shape[0], axes)
    # Local images vs all texts: s^I rows for our images.
    s_image = _local_image_scores(images, image_mask, common.gather(texts, axes),
                                  common.gather(text_mask, axes))  # [b, B]
    # Start s^T only once s^I is reduced, so one [b, B, Ni, Nt] tensor is alive at a time
    # (in the backward pass too, in reverse). XLA:GPU/TPU schedule around the barrier;
    # XLA:CPU drops barriers before scheduling, so there both may coexist.
    s_image, all_images = jax.lax.optimization_barrier((s_image, common.gather(images, axes)))
    # All images vs local texts: s^T columns for our texts, transposed to text rows.
    s_text = _local_text_scores(all_images, common.gather(image_mask, axes),
                                texts, text_mask).T  # [b, B]
    total = (common.cross_entropy_sum(scale * s_image, labels)
             + common.cross_entropy_sum(scale * s_text, labels))
    return jax.lax.psum(total, axes) / (2 * batch)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axes),) * 4 + (P(),), out_specs=P())
  return sharded(image_tokens, jnp.asarray(image_mask).astype(bool), text_tokens,
                 jnp.asarray(text_mask).astype(bool), common.as_scalar(scale))

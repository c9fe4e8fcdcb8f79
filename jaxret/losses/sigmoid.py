"""SigLIP loss (Zhai 2023): independent binary log-loss on every image-text pair."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxret.losses import common


def sigmoid_reference(image_emb, text_emb, scale, bias, negatives=None):
  """Full-batch SigLIP loss: -sum_ij log sigmoid(z_ij (scale <x_i,y_j> + bias)) / B. Hard
  `negatives` [B, k, d] add B*k columns that are negative pairs for every image."""
  batch = image_emb.shape[0]
  logits = scale * image_emb @ text_emb.T + bias
  signs = 2 * jnp.eye(batch) - 1  # +1 for matched pairs, -1 for all others
  total = -jnp.sum(jax.nn.log_sigmoid(signs * logits))
  if negatives is not None:
    total -= jnp.sum(jax.nn.log_sigmoid(-(scale * image_emb @ common.flat(negatives).T + bias)))
  return total / batch


IMPLS = ("all_gather", "ring")


def sigmoid_loss(image_emb, text_emb, scale, bias, *, mesh, axes=common.DEFAULT_AXES,
                 impl="all_gather", moves="auto", negatives=None):
  """`sigmoid_reference` on global arrays whose batch is split over mesh `axes`.

  The loss is one sum over all B x B pairs, so local image rows against all texts cover
  every pair once. impl "all_gather": gather the texts, memory b x B. "ring" (SigLIP
  §3.3): pass the texts round the ring instead, memory b x b; `moves`: how (common.Ring).
  `negatives` [B, k, d]: hard negative captions, negative pairs for every image; they travel
  with their examples' texts.
  """
  axes = common.batch_axes(mesh, axes)
  batch = common.global_batch(mesh, axes, image_emb=image_emb, text_emb=text_emb,
                              **({} if negatives is None else {"negatives": negatives}))
  extra = () if negatives is None else (negatives,)
  if impl == "ring":
    return _ring(image_emb, text_emb, scale, bias, extra, mesh, axes, batch, moves)

  def local(images, texts, scale, bias, *negs):
    labels = common.positive_columns(images.shape[0], axes)
    logits = scale * common.dot(images, common.gather(texts, axes)) + bias  # [b, B]
    signs = jnp.where(jnp.arange(batch)[None, :] == labels[:, None], 1.0, -1.0)
    total = -jnp.sum(jax.nn.log_sigmoid(signs * logits))
    if negs:
      neg_logits = scale * common.dot(images, common.gather(common.flat(negs[0]), axes)) + bias
      total -= jnp.sum(jax.nn.log_sigmoid(-neg_logits))
    return jax.lax.psum(total, axes) / batch

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()) + (P(axes),) * len(extra),
                          out_specs=P())
  return sharded(image_emb, text_emb, common.as_scalar(scale), common.as_scalar(bias), *extra)


def _block_loss(images, texts, scale, bias, own):
  """Summed log-loss of one block (b images x the travelling texts: b real ones, then any
  negatives); the own block has the positives on the diagonal of its real texts."""
  logits = scale * common.dot(images, texts) + bias
  signs = 2 * jnp.eye(*logits.shape, dtype=logits.dtype) - 1 if own else -1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits))


def _ring_sum(images, texts, scale, bias, axes, size, moves, grads):
  """The local sum over all pairs of this device's images, with its gradients when `grads`.

  Every block's gradient is known as soon as the block is (no global normaliser), so the
  gradients are made in the same pass; each text's gradient travels with it (one
  collective per move) and is home after the D-th move.
  """
  def visit(texts, own):
    args = (images, texts, scale, bias)
    if not grads:
      return _block_loss(*args, own), None
    value, pull = jax.vjp(functools.partial(_block_loss, own=own), *args)
    return value, pull(jnp.ones_like(value))

  total, d = visit(texts, own=True)
  ring = common.Ring(axes, size, texts, moves)

  def step(carry, parity):
    total, texts, d = carry
    if grads:
      texts, d_texts = ring.move((texts, d[1]), parity)
      d = (d[0], d_texts, d[2], d[3])
    else:
      texts = ring.move(texts, parity)
    value, d_new = visit(texts, own=False)
    if grads:
      d = jax.tree.map(jnp.add, d, d_new)
    return total + value, texts, d

  total, _, d = ring.walk(step, (total, texts, d), size - 1)
  if grads:
    d = (d[0], ring.move(d[1], (size - 1) % 2), d[2], d[3])
  return total, d


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring_loss(images, texts, scale, bias, axes, size, moves):
  return _ring_sum(images, texts, scale, bias, axes, size, moves, grads=False)[0]


def _ring_loss_fwd(images, texts, scale, bias, axes, size, moves):
  return _ring_sum(images, texts, scale, bias, axes, size, moves, grads=True)


def _ring_loss_bwd(axes, size, moves, d, g):
  return tuple(g * x for x in d)


_ring_loss.defvjp(_ring_loss_fwd, _ring_loss_bwd)


def _ring(image_emb, text_emb, scale, bias, extra, mesh, axes, batch, moves):
  size = common.ring_size(mesh, axes)

  def local(images, texts, scale, bias, *negs):
    wire = jnp.concatenate([texts, common.flat(negs[0])]) if negs else texts
    total = _ring_loss(images, wire, common.varying(scale, axes), common.varying(bias, axes),
                       axes, size, moves)
    return jax.lax.psum(total, axes) / batch

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()) + (P(axes),) * len(extra),
                          out_specs=P())
  return sharded(image_emb, text_emb, common.as_scalar(scale), common.as_scalar(bias), *extra)

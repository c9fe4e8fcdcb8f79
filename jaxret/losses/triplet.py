"""VSE++ hinge loss (Faghri et al. 2018): a margin between each positive pair's cosine
similarity and its negatives', in both directions, over the global batch.

With s(i, t) the cosine similarity (the embeddings are L2-normalised) and margin a, a positive
pair (i, t_i) costs, per direction, [a - s(i, t_i) + s(negative)]_+ summed over its B - 1
negatives (VSE0, `max_violation=False`) or for its hardest negative only (VSE++). The loss is
the mean over the B positive pairs of both directions' costs (VSE++'s code sums them; the mean
keeps the loss, and so the step size, independent of the batch size). The model's learnt scale
plays no part: VSE++ scores with raw cosines, so the temperature gets no gradient.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxret.losses import common


def triplet_reference(image_emb, text_emb, margin, max_violation):
  """Full-batch VSE0 / VSE++ loss, mean over the B positive pairs."""
  scores = image_emb @ text_emb.T  # [B images, B texts]
  positive = jnp.diagonal(scores)
  eye = jnp.eye(scores.shape[0], dtype=bool)
  image_to_text = jnp.where(eye, 0.0, jax.nn.relu(margin - positive[:, None] + scores))
  text_to_image = jnp.where(eye, 0.0, jax.nn.relu(margin - positive[None, :] + scores))
  reduce = jnp.max if max_violation else jnp.sum
  total = jnp.sum(reduce(image_to_text, axis=1)) + jnp.sum(reduce(text_to_image, axis=0))
  return total / scores.shape[0]


IMPLS = ("all_gather", "ring")


def triplet_loss(image_emb, text_emb, *, mesh, axes=common.DEFAULT_AXES, margin=0.2,
                 max_violation=True, impl="all_gather", moves="auto"):
  """`triplet_reference` on global arrays whose batch is split over mesh `axes`.

  impl "all_gather": local images against the gathered texts and local texts against the
  gathered images, memory b x B. "ring": texts (with their positive scores and global
  indices) travel round the ring, memory b x b; `moves`: how (common.Ring).
  Hardest negatives: the first of equal ones takes the gradient (jnp.argmax; VSE++'s torch
  `max(1)` also picks one), where the reference's jnp.max splits it among them. The two agree
  except on exact ties, i.e. duplicate embeddings in a batch.
  """
  axes = common.batch_axes(mesh, axes)
  batch = common.global_batch(mesh, axes, image_emb=image_emb, text_emb=text_emb)
  margin = float(margin)
  if impl == "ring":
    size = common.ring_size(mesh, axes)

    def local(images, texts):
      pos = _pair_scores(images, texts)
      total = _ring_total(images, texts, pos, pos, axes, size, moves, margin, max_violation)
      return jax.lax.psum(total, axes) / batch
  else:
    def local(images, texts):
      idx = common.positive_columns(images.shape[0], axes)
      pos = _pair_scores(images, texts)
      image_rows = _hinges(common.dot(images, common.gather(texts, axes)), pos, idx, margin)
      text_rows = _hinges(common.dot(texts, common.gather(images, axes)), pos, idx, margin)
      total = _reduce(image_rows, max_violation) + _reduce(text_rows, max_violation)
      return jax.lax.psum(total, axes) / batch

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes)), out_specs=P())
  return sharded(image_emb, text_emb)


def _pair_scores(images, texts):
  """s(i, t_i): local rows of both sides are the positive pairs."""
  return jnp.einsum("bd,bd->b", images, texts, preferred_element_type=jnp.float32)


def _hinges(rows, pos, idx, margin):
  """[margin - s(positive) + s(row, column)]_+ for [b, B] `rows`, 0 at each row's positive."""
  own = jnp.arange(rows.shape[1])[None, :] == idx[:, None]
  return jnp.where(own, 0.0, jax.nn.relu(margin - pos[:, None] + rows))


def _reduce(hinges, max_violation):
  if not max_violation:
    return jnp.sum(hinges)
  hardest = jnp.argmax(hinges, axis=1)
  return jnp.sum(jnp.take_along_axis(hinges, hardest[:, None], axis=1))


# ----------------------------------------------------------------------------------------
# Ring: each device keeps its images and scores every visiting block of texts both ways.
# Rows (its images) fold into a local sum or running max; columns (the visiting texts) fold
# into one that travels with the texts. A global index travels with every text, so a block
# finds its positives (and a max its first hardest negative) wherever the walk is.
# The backward re-walks the ring in reverse (as ring.lse_sum does), recomputing each block
# and pulling back a cotangent that is 1 everywhere (sum) or 1 at the hardest negative (max);
# each text's gradient travels with it and is home after the last move.


def _block(images, image_idx, pos_img, texts, text_idx, pos_txt, margin):
  """Both directions' hinges of one b x b block: rows per image, columns per text."""
  scores = common.dot(images, texts)
  own = image_idx[:, None] == text_idx[None, :]
  rows = jnp.where(own, 0.0, jax.nn.relu(margin - pos_img[:, None] + scores))
  cols = jnp.where(own, 0.0, jax.nn.relu(margin - pos_txt[None, :] + scores))
  return rows, cols


def _fold(state, hinges, other_idx, axis, max_violation):
  """Fold one block into a direction's state: (sum,) or (max, global index of the first max)."""
  if not max_violation:
    return (state[0] + jnp.sum(hinges, axis=axis),)
  value = jnp.max(hinges, axis=axis)
  arg = other_idx[jnp.argmax(hinges, axis=axis)]
  if state is None:
    return value, arg
  best, best_arg = state
  take = (value > best) | ((value == best) & (arg < best_arg))  # blocks arrive in any order
  return jnp.where(take, value, best), jnp.where(take, arg, best_arg)


def _forward(images, texts, pos_img, pos_txt, axes, size, moves, margin, max_violation):
  idx = common.positive_columns(images.shape[0], axes)
  ring = common.Ring(axes, size, texts, moves)

  def visit(row_state, travel):
    texts, text_idx, pos_txt, col_state = travel
    rows, cols = _block(images, idx, pos_img, texts, text_idx, pos_txt, margin)
    return (_fold(row_state, rows, text_idx, 1, max_violation),
            (texts, text_idx, pos_txt, _fold(col_state, cols, idx, 0, max_violation)))

  zero = None if max_violation else (jnp.zeros_like(pos_img),)
  row_state, travel = visit(zero, (texts, idx, pos_txt, zero))  # own block first

  def step(carry, parity):
    row_state, travel = carry
    return visit(row_state, ring.move(travel, parity))

  row_state, travel = ring.walk(step, (row_state, travel), size - 1)
  total = jnp.sum(row_state[0]) + jnp.sum(travel[3][0])  # columns: the texts held now, complete
  return total, (row_state, travel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _ring_total(images, texts, pos_img, pos_txt, axes, size, moves, margin, max_violation):
  """This device's share of the summed hinges; only the psum over `axes` is meaningful."""
  return _forward(images, texts, pos_img, pos_txt, axes, size, moves, margin, max_violation)[0]


def _ring_total_fwd(images, texts, pos_img, pos_txt, axes, size, moves, margin, max_violation):
  total, (row_state, travel) = _forward(images, texts, pos_img, pos_txt, axes, size, moves,
                                        margin, max_violation)
  return total, (images, pos_img, row_state, travel)


def _ring_total_bwd(axes, size, moves, margin, max_violation, res, g):
  images, pos_img, row_state, (texts, text_idx, pos_txt, col_state) = res
  idx = common.positive_columns(images.shape[0], axes)
  ring = common.Ring(axes, size, texts, moves)  # moves as the forward's did

  def visit(texts, text_idx, pos_txt, col_state):
    fn = lambda im, pi, tx, pt: _block(im, idx, pi, tx, text_idx, pt, margin)
    (rows, cols), pull = jax.vjp(fn, images, pos_img, texts, pos_txt)
    if max_violation:  # the hardest negative of each row and column takes the gradient
      d_rows = g * (text_idx[None, :] == row_state[1][:, None]).astype(rows.dtype)
      d_cols = g * (idx[:, None] == col_state[1][None, :]).astype(cols.dtype)
    else:
      d_rows, d_cols = g * jnp.ones_like(rows), g * jnp.ones_like(cols)
    return pull((d_rows, d_cols))

  d_images, d_pos_img, d_texts, d_pos_txt = visit(texts, text_idx, pos_txt, col_state)

  def step(carry, parity):  # undo the forward's moves, last first: home after D-1
    d_images, d_pos_img, travel = carry
    travel = ring.move(travel, parity, inverse=True)
    texts, text_idx, pos_txt, col_state, d_texts, d_pos_txt = travel
    di, dpi, dt, dpt = visit(texts, text_idx, pos_txt, col_state)
    return (d_images + di, d_pos_img + dpi,
            (texts, text_idx, pos_txt, col_state, d_texts + dt, d_pos_txt + dpt))

  carry = (d_images, d_pos_img, (texts, text_idx, pos_txt, col_state, d_texts, d_pos_txt))
  d_images, d_pos_img, travel = ring.walk(step, carry, size - 1, first=size - 2)
  return d_images, travel[4], d_pos_img, travel[5]


_ring_total.defvjp(_ring_total_fwd, _ring_total_bwd)

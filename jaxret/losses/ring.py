"""Ring form of the symmetric InfoNCE normaliser, memory b x b, exact gradients.

Each device keeps its b images and passes its b texts round the ring of D devices
(`common.Ring`). At every stop it scores one b x b block and folds it into an
online log-sum-exp: over the block's columns for its own image rows, and over the
block's rows for the visiting texts (that running sum travels with the texts). Autodiff
through the loop would keep every block (b x B), so a custom_vjp re-runs the ring in the
backward pass: block scores are recomputed and their softmax weights come from the
log-sum-exps. The backward starts where the forward stopped and undoes its moves, so
each text's gradient, travelling with it, lands home on the last of D-1 moves: 2(D-1)
moves in all, each one collective."""

import functools

import jax
import jax.numpy as jnp

from jaxret.losses import common


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def lse_sum(block, axes, size, wire_dtype, moves, images, image_aux, texts, text_aux, params):
  """sum_i lse_j row[i, j] + sum_j lse_i col[i, j], summed over the ring by the caller.

  Rows are this device's images i. Which texts' column terms a device returns is not fixed
  (those it holds when the ring stops), so only the psum over `axes` is meaningful and the
  cotangent must be the same on every device (as it is after a psum).
  block(images, image_aux, texts, text_aux, params) -> (row, col), both [b_images, b_texts]
  logits of one block. `texts` (arrays) and `text_aux` (masks, no gradient) travel; texts
  travel as `wire_dtype` (None: as they are) and are scored as fp32 after arrival; `moves`:
  how (common.Ring).
  """
  return _forward(block, axes, size, wire_dtype, moves, images, image_aux, texts, text_aux, params)[0]


def _score(block, images, image_aux, texts, text_aux, params):
  return block(images, image_aux, texts.astype(images.dtype), text_aux, params)


def _forward(block, axes, size, wire_dtype, moves, images, image_aux, texts, text_aux, params):
  wire = texts.astype(wire_dtype or texts.dtype)
  walk = common.Ring(axes, size, wire, moves)
  row, col = _score(block, images, image_aux, wire, text_aux, params)  # own block first
  row_lse, col_lse = jax.nn.logsumexp(row, axis=1), jax.nn.logsumexp(col, axis=0)

  def step(carry, parity):
    row_lse, wire, text_aux, col_lse = carry
    wire, text_aux, col_lse = walk.move((wire, text_aux, col_lse), parity)
    row, col = _score(block, images, image_aux, wire, text_aux, params)
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(row, axis=1))
    col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(col, axis=0))
    return row_lse, wire, text_aux, col_lse

  carry = (row_lse, wire, text_aux, col_lse)
  row_lse, wire, text_aux, col_lse = walk.walk(step, carry, size - 1)
  total = jnp.sum(row_lse) + jnp.sum(col_lse)  # col_lse: the texts held now, complete
  return total, (row_lse, wire, text_aux, col_lse)


def _lse_sum_fwd(block, axes, size, wire_dtype, moves, images, image_aux, texts, text_aux,
                 params):
  total, held = _forward(block, axes, size, wire_dtype, moves, images, image_aux, texts, text_aux, params)
  return total, (images, image_aux, params, jnp.zeros((0,), texts.dtype)) + held


def _lse_sum_bwd(block, axes, size, wire_dtype, moves, res, g):
  images, image_aux, params, like, row_lse, wire, text_aux, col_lse = res
  walk = common.Ring(axes, size, wire, moves)  # moves as the forward's did

  def visit(wire, text_aux, col_lse):
    # d lse / d logit = softmax weight; recompute the block and pull the weights back.
    fn = lambda im, tx, p: block(im, image_aux, tx, text_aux, p)
    (row, col), pull = jax.vjp(fn, images, wire.astype(images.dtype), params)
    return pull((g * jnp.exp(row - row_lse[:, None]), g * jnp.exp(col - col_lse[None, :])))

  d_images, d_texts, d_params = visit(wire, text_aux, col_lse)

  def step(carry, parity):  # undo the forward's moves, last first: home after D-1
    d_images, d_params, wire, text_aux, col_lse, d_texts = carry
    wire, text_aux, col_lse, d_texts = walk.move((wire, text_aux, col_lse, d_texts), parity,
                                                 inverse=True)
    di, dt, dp = visit(wire, text_aux, col_lse)
    return (d_images + di, jax.tree.map(jnp.add, d_params, dp), wire, text_aux, col_lse,
            d_texts + dt)

  carry = (d_images, d_params, wire, text_aux, col_lse, d_texts)
  d_images, d_params, _, _, _, d_texts = walk.walk(step, carry, size - 1, first=size - 2)
  return d_images, None, d_texts.astype(like.dtype), None, d_params


lse_sum.defvjp(_lse_sum_fwd, _lse_sum_bwd)

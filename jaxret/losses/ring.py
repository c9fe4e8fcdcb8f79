"""Ring form of the symmetric InfoNCE normaliser, memory b x b, exact gradients.

Each device keeps its b images and passes its b texts round the ring of D devices
(`jax.lax.ppermute`). At every stop it scores one b x b block and folds it into an
online log-sum-exp: over the block's columns for its own image rows, and over the
block's rows for the visiting texts (that running sum travels with the texts and is
home after D shifts). Autodiff through the loop would keep every block (b x B), so a
custom_vjp re-runs the ring in the backward pass: block scores are recomputed, their
softmax weights come from the saved log-sum-exps, and each text's gradient travels
with it and lands home after D shifts.
"""

import functools

import jax
import jax.numpy as jnp

from jaxret.losses import common


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def lse_sum(block, axes, size, wire_dtype, images, image_aux, texts, text_aux, params):
  """sum_i lse_j row[i, j] + sum_j lse_i col[i, j] over this device's images i and texts j.

  block(images, image_aux, texts, text_aux, params) -> (row, col), both [b_images, b_texts]
  logits of one block. `texts` (arrays) and `text_aux` (masks, no gradient) travel; texts
  travel as `wire_dtype` (None: as they are) and are scored as fp32 after arrival.
  """
  total, _ = _forward(block, axes, size, wire_dtype, images, image_aux, texts, text_aux, params)
  return total


def _score(block, images, image_aux, texts, text_aux, params):
  return block(images, image_aux, texts.astype(images.dtype), text_aux, params)


def _forward(block, axes, size, wire_dtype, images, image_aux, texts, text_aux, params):
  texts = texts.astype(wire_dtype or texts.dtype)

  def visit(row_lse, col_lse, texts, text_aux):
    row, col = _score(block, images, image_aux, texts, text_aux, params)
    row_lse = jax.nn.logsumexp(row, axis=1) if row_lse is None else jnp.logaddexp(
        row_lse, jax.nn.logsumexp(row, axis=1))
    col_lse = jax.nn.logsumexp(col, axis=0) if col_lse is None else jnp.logaddexp(
        col_lse, jax.nn.logsumexp(col, axis=0))
    return row_lse, col_lse

  row_lse, col_lse = visit(None, None, texts, text_aux)  # own block first

  def step(carry, _):
    row_lse, col_lse, texts, text_aux = carry
    col_lse, texts, text_aux = common.shift((col_lse, texts, text_aux), axes, size)
    row_lse, col_lse = visit(row_lse, col_lse, texts, text_aux)
    return (row_lse, col_lse, texts, text_aux), None

  (row_lse, col_lse, _, _), _ = jax.lax.scan(step, (row_lse, col_lse, texts, text_aux), None,
                                             length=size - 1)
  col_lse = common.shift(col_lse, axes, size)  # home: the log-sum-exps of this device's texts
  return jnp.sum(row_lse) + jnp.sum(col_lse), (row_lse, col_lse)


def _lse_sum_fwd(block, axes, size, wire_dtype, images, image_aux, texts, text_aux, params):
  total, (row_lse, col_lse) = _forward(block, axes, size, wire_dtype, images, image_aux, texts,
                                       text_aux, params)
  return total, (images, image_aux, texts, text_aux, params, row_lse, col_lse)


def _lse_sum_bwd(block, axes, size, wire_dtype, res, g):
  images, image_aux, texts, text_aux, params, row_lse, col_lse = res
  out_dtype = texts.dtype
  wire = texts.astype(wire_dtype or texts.dtype)

  def visit(col_lse, wire, text_aux):
    # d lse / d logit = softmax weight; recompute the block and pull the weights back.
    fn = lambda im, tx, p: block(im, image_aux, tx, text_aux, p)
    (row, col), pull = jax.vjp(fn, images, wire.astype(images.dtype), params)
    return pull((g * jnp.exp(row - row_lse[:, None]), g * jnp.exp(col - col_lse[None, :])))

  d_images, d_texts, d_params = visit(col_lse, wire, text_aux)

  def step(carry, _):
    d_images, d_params, col_lse, wire, text_aux, d_texts = carry
    col_lse, wire, text_aux, d_texts = common.shift((col_lse, wire, text_aux, d_texts), axes, size)
    di, dt, dp = visit(col_lse, wire, text_aux)
    return (d_images + di, jax.tree.map(jnp.add, d_params, dp), col_lse, wire, text_aux,
            d_texts + dt), None

  carry = (d_images, d_params, col_lse, wire, text_aux, d_texts)
  (d_images, d_params, _, _, _, d_texts), _ = jax.lax.scan(step, carry, None, length=size - 1)
  d_texts = common.shift(d_texts, axes, size)  # each text's gradient, home
  return d_images, None, d_texts.astype(out_dtype), None, d_params


lse_sum.defvjp(_lse_sum_fwd, _lse_sum_bwd)

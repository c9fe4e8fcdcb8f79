"""Exact large-batch contrastive gradients with micro-batch activation memory (GradCache,
Gao et al. 2021).

A contrastive loss couples every pair in the global batch, so plain gradient accumulation
(a loss per micro-batch) changes the objective. GradCache keeps it exact:
  1. embed every micro-batch, keeping only the embeddings (no activations);
  2. take the global loss and its gradient with respect to those embeddings;
  3. per micro-batch, recompute the towers and backpropagate that embedding gradient,
     summing the parameter gradients.
Peak activation memory is one micro-batch's; the result equals the one-big-batch gradient.
"""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxret.train.objective import objective

# Float, per-example outputs that gradients flow through; masks ride along without gradient.
EMBEDDINGS = ("image_emb", "text_emb", "image_tokens", "text_tokens", "neg_text_emb",
              "neg_text_tokens")


def value_and_grad(model, loss, params, batch, *, mesh, axes, steps, distill=None,
                   teacher_emb=None):
  """-> (loss value, model outputs incl. scale/bias, grads w.r.t. params). `distill` and
  `teacher_emb`: loss.distill's term (train/objective.py), on the whole batch's embeddings."""
  size = batch["image"].shape[0]
  micro_sh = NamedSharding(mesh, P(None, axes))

  # Micro-batch j holds rows i with i % steps == j: each device keeps an equal share of every
  # micro-batch (its rows stay where they are), and the global loss is unchanged because
  # images and texts are regrouped alike.
  def split(x):
    x = x.reshape(size // steps, steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sh)

  def merge(x):
    return x.swapaxes(0, 1).reshape(size, *x.shape[2:])

  def embed(p, micro):
    out = model.apply({"params": p}, micro["image"], micro["text"], tokens=loss.needs_tokens,
                      neg_text=micro.get("neg_text"))
    emb = {k: out[k] for k in EMBEDDINGS if k in out}
    rest = {k: v for k, v in out.items() if k not in emb and k not in ("scale", "bias")}
    return emb, rest

  micro = jax.tree.map(split, {k: batch[k] for k in ("image", "text", "neg_text") if k in batch})
  emb, rest = jax.lax.map(lambda m: embed(jax.lax.stop_gradient(params), m), micro)
  emb, rest = jax.tree.map(merge, emb), jax.tree.map(merge, rest)

  def global_loss(emb, p):
    out = {**emb, **rest, **model.apply({"params": p}, method=model.temperature)}
    return objective(loss, out, mesh=mesh, axes=axes, distill=distill, teacher_emb=teacher_emb)

  (value, out), (g_emb, g_params) = jax.value_and_grad(
      global_loss, argnums=(0, 1), has_aux=True)(emb, params)
  # g_params so far holds the temperature's (and bias's) gradient, zeros elsewhere.

  def backprop(acc, xs):
    m, g = xs
    _, vjp = jax.vjp(lambda p: embed(p, m)[0], params)
    return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

  grads, _ = jax.lax.scan(backprop, g_params, (micro, jax.tree.map(split, g_emb)))
  return value, out, grads

"""The jitted train step: model -> loss kernel -> grads -> optax, with explicit shardings.

`train_step(state, batch) -> (state, metrics)` is pure; the state buffers are donated.
"""
import jax
import jax.numpy as jnp
import optax

from jaxret.parallel import partitioning
from jaxret.parallel.mesh import BATCH_AXES
from jaxret.train import grad_cache


def loss_and_grads(model, loss, params, batch, *, mesh, accum_steps=1):
  """-> (loss, model outputs, grads) for one global batch; with accum_steps > 1 the exact
  GradCache form, whose activation memory is one micro-batch's."""
  if accum_steps > 1:
    return grad_cache.value_and_grad(model, loss, params, batch, mesh=mesh, axes=BATCH_AXES,
                                     steps=accum_steps)

  def loss_fn(p):
    out = model.apply({"params": p}, batch["image"], batch["text"], tokens=loss.needs_tokens,
                      neg_text=batch.get("neg_text"))
    return loss.fn(out, mesh=mesh, axes=BATCH_AXES, options=loss.options), out

  (value, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return value, out, grads


def make_train_step(model, loss, tx, schedule, mesh, state_sh, accum_steps=1,
                    rules=partitioning.DEFAULT_RULES, frozen=None, negatives=False):
  """`rules`: the logical-axis rules the activations are constrained by (the run's
  `mesh.rules`, as Experiment.rules); the parameters' come with `state_sh`.
  `frozen`: a tree of bools like the params (optim.rules). The optimizer already ignores frozen
  gradients; zeroing them here too lets XLA drop their backward pass (a locked tower costs only
  its forward) and keeps them out of the logged grad_norm.
  `negatives`: batches carry "neg_text" [B, k, L] hard negative captions (data.hard_negatives)."""
  def train_step(state, batch):
    value, out, grads = loss_and_grads(model, loss, state.params, batch, mesh=mesh,
                                       accum_steps=accum_steps)
    if frozen is not None:
      grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    metrics = {"loss": value, "scale": out["scale"], "lr": schedule(state.step),
               "grad_norm": grad_norm,
               # Read by train/health.py before any save; a NaN/inf gradient makes the norm one.
               "nonfinite": ~(jnp.isfinite(value) & jnp.isfinite(grad_norm))}
    if "bias" in out:
      metrics["bias"] = out["bias"]
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  keys = ("image", "text") + (("neg_text",) if negatives else ())
  batch_sh = {key: partitioning.batch_sharding(mesh) for key in keys}
  jitted = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, partitioning.replicated(mesh)), donate_argnums=0)

  def step(state, batch):
    with partitioning.activate(mesh, rules):
      return jitted(state, batch)
  step.jitted = jitted
  return step


"""The jitted train step: model -> loss kernel -> grads -> optax, with explicit shardings.

`train_step(state, batch) -> (state, metrics)` is pure; the state buffers are donated.
"""
import jax
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
    out = model.apply({"params": p}, batch["image"], batch["text"], tokens=loss.needs_tokens)
    return loss.fn(out, mesh=mesh, axes=BATCH_AXES, options=loss.options), out

  (value, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return value, out, grads


def make_train_step(model, loss, tx, schedule, mesh, state_sh, accum_steps=1):
  def train_step(state, batch):
    value, out, grads = loss_and_grads(model, loss, state.params, batch, mesh=mesh,
                                       accum_steps=accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value, "scale": out["scale"], "lr": schedule(state.step),
               "grad_norm": optax.global_norm(grads)}
    if "bias" in out:
      metrics["bias"] = out["bias"]
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_sh = {"image": partitioning.batch_sharding(mesh), "text": partitioning.batch_sharding(mesh)}
  jitted = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, partitioning.replicated(mesh)), donate_argnums=0)

  def step(state, batch):
    with partitioning.activate(mesh):
      return jitted(state, batch)
  step.jitted = jitted
  return step


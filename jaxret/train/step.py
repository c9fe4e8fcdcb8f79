"""The jitted train step: model -> loss kernel -> grads -> optax, with explicit shardings.

`train_step(state, batch) -> (state, metrics)` is pure; the state buffers are donated.
"""
import jax
import optax

from jaxret.parallel import partitioning
from jaxret.parallel.mesh import BATCH_AXES


def make_train_step(model, loss, tx, schedule, mesh, state_sh):
  def train_step(state, batch):
    def loss_fn(params):
      out = model.apply({"params": params}, batch["image"], batch["text"],
                        tokens=loss.needs_tokens)
      return loss.fn(out, mesh=mesh, axes=BATCH_AXES, options=loss.options), out

    (value, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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


"""The jitted train step: model -> loss kernel -> grads -> optax, with explicit shardings.

`train_step(state, batch) -> (state, metrics)` is pure; the state buffers are donated.
"""
import jax
import jax.numpy as jnp
import optax

from jaxret.parallel import partitioning
from jaxret.parallel.mesh import BATCH_AXES
from jaxret.train import grad_cache
from jaxret.train.objective import objective
from jaxret.inference.teacher import teacher_embeddings


def loss_and_grads(model, loss, params, batch, *, mesh, accum_steps=1, distill=None,
                   teacher=None, teacher_params=None):
  """-> (loss, model outputs, grads) for one global batch; with accum_steps > 1 the exact
  GradCache form, whose activation memory is one micro-batch's. With `distill` (the config's
  loss.distill), the teacher's embeddings come from `teacher` (inference/teacher.py) or, offline,
  from the batch."""
  teacher_emb = None
  if distill is not None:
    teacher_emb = teacher_embeddings(teacher, teacher_params, batch)
  if accum_steps > 1:
    return grad_cache.value_and_grad(model, loss, params, batch, mesh=mesh, axes=BATCH_AXES,
                                     steps=accum_steps, distill=distill, teacher_emb=teacher_emb)

  def loss_fn(p):
    out = model.apply({"params": p}, batch["image"], batch["text"], tokens=loss.needs_tokens,
                      neg_text=batch.get("neg_text"))
    return objective(loss, out, mesh=mesh, axes=BATCH_AXES, distill=distill,
                     teacher_emb=teacher_emb)

  (value, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return value, out, grads


def make_train_step(model, loss, tx, schedule, mesh, state_sh, accum_steps=1,
                    rules=partitioning.DEFAULT_RULES, frozen=None, negatives=False,
                    distill=None, teacher=None):
  """`rules`: the logical-axis rules the activations are constrained by (the run's
  `mesh.rules`, as Experiment.rules); the parameters' come with `state_sh`.
  `frozen`: a tree of bools like the params (optim.rules). The optimizer already ignores frozen
  gradients; zeroing them here too lets XLA drop their backward pass (a locked tower costs only
  its forward) and keeps them out of the logged grad_norm.
  `negatives`: batches carry "neg_text" [B, k, L] hard negative captions (data.hard_negatives).
  `distill`: the config's loss.distill section as a dict, with `teacher` (inference/teacher.py) run
  in the step, frozen, its parameters an argument sharded like the student's; without a teacher
  the batches carry its embeddings (offline)."""
  def train_step(state, batch, teacher_params):
    value, out, grads = loss_and_grads(model, loss, state.params, batch, mesh=mesh,
                                       accum_steps=accum_steps, distill=distill, teacher=teacher,
                                       teacher_params=teacher_params)
    if frozen is not None:
      grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    metrics = {"loss": value, "scale": out["scale"], "lr": schedule(state.step),
               "grad_norm": grad_norm,
               # Read by train/health.py before any save; a NaN/inf gradient makes the norm one.
               "nonfinite": ~(jnp.isfinite(value) & jnp.isfinite(grad_norm))}
    for key in ("bias", "distill"):
      if key in out:
        metrics[key] = out[key]
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  keys = ("image", "text") + (("neg_text",) if negatives else ())
  if distill is not None:
    keys += (("teacher_text",) if teacher.own_tokens else ()) if teacher is not None else (
        "teacher_image_emb", "teacher_text_emb")
  batch_sh = {key: partitioning.batch_sharding(mesh) for key in keys}
  teacher_params = teacher.params if teacher is not None else {}
  teacher_sh = jax.tree.map(lambda a: a.sharding, teacher_params)
  jitted = jax.jit(train_step, in_shardings=(state_sh, batch_sh, teacher_sh),
                   out_shardings=(state_sh, partitioning.replicated(mesh)), donate_argnums=0)

  def step(state, batch):
    with partitioning.activate(mesh, rules):
      return jitted(state, batch, teacher_params)
  step.jitted = jitted
  return step


"""`jaxret inspect`: will this config fit this mesh? Answered before launching, without the mesh.

Parameters and optimizer state per device come from the same logical-axis rules training
uses, evaluated on an AbstractMesh of any size (no devices, no allocation). FLOPs are the
matmuls of one device's traced train step (train/flops.py: scanned layers times their count;
XLA's cost analysis counts a loop body once). Activations come from XLA itself: it compiles
that step (local batch, this machine's backend) and reports the program's temporary memory.

How good the activation figure is (checked against compiled sharded steps on 8 CPU devices):
within a few percent for data parallel and FSDP with the softmax and sigmoid losses; low for
tensor parallelism (resharding buffers) and for FILIP's all-gather form, whose gathered
tokens grow with the global batch (use loss.impl=ring, whose memory is the local block's).

An online distillation teacher (loss.distill) is loaded once, so a bad one fails here as it
would at the start of training; its parameters are placed by the student's rules, its forward
pass is in the traced FLOPs and the compiled temporaries. Offline, the step only reads stored
embeddings: nothing is added.
"""
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType

from jaxret import losses
from jaxret.errors import UserError
from jaxret.data import sources
from jaxret.experiment import abstract_boxed_params, check_components, state_shardings
from jaxret.inference.teacher import (load_teacher, param_shardings, teacher_embeddings,
                                      tokenizer_path)
from jaxret.models.attention import for_platform
from jaxret.models.two_tower import build_model
from jaxret.optim import make_optimizer
from jaxret.param_rules import param_paths
from jaxret.parallel import partitioning
from jaxret.parallel.mesh import AXES, BATCH_AXES, make_mesh
from jaxret.train.flops import jaxpr_matmul_flops
from jaxret.train.objective import distill_options
from jaxret.train.step import make_train_step

GiB = 1024 ** 3


def parse_mesh(text):
  """'data=64,fsdp=4,tensor=1' -> {'data': 64, 'fsdp': 4, 'tensor': 1} (missing axes are 1)."""
  sizes = dict.fromkeys(AXES, 1)
  for part in filter(None, (text or "").split(",")):
    name, eq, value = part.partition("=")
    if not eq or name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise UserError(f"--mesh '{text}': expected AXIS=SIZE pairs over {', '.join(AXES)}, "
                      "e.g. data=64,fsdp=4,tensor=1")
    sizes[name.strip()] = int(value)
  return sizes


def _bytes_per_device(abstract):
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract))


def plan(cfg, mesh_sizes, *, compile_activations=True):
  """-> dict of the plan; `mesh_sizes` like {'data': 256, 'fsdp': 1, 'tensor': 1}."""
  check_components(cfg)
  if not cfg.model.text.vocab_size:
    raise UserError("inspect needs model.text.vocab_size (the config takes it from the data's "
                    "tokenizer): pass --config.model.text.vocab_size=N")
  mesh = AbstractMesh(tuple(mesh_sizes[a] for a in AXES), AXES,
                      axis_types=(AxisType.Auto,) * len(AXES))
  batch_devices = math.prod(mesh_sizes[a] for a in BATCH_AXES)
  if cfg.batch_size % batch_devices:
    raise UserError(f"batch_size {cfg.batch_size} does not split over data x fsdp = "
                    f"{batch_devices} devices; change the batch or the mesh")
  local_batch = cfg.batch_size // batch_devices
  # Planned here with the attention these devices have (xla on a laptop planning a TPU run):
  # the same parameters and matmuls; a fused kernel's activation memory may be lower.
  model = build_model(cfg.model, attention=for_platform(
      cfg.model.attention, jax.devices()[0].platform, cfg.model.dtype))
  tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
  rules = cfg.mesh.rules
  abstract, _ = state_shardings(model, tx, mesh, cfg.model.image.size, rules)

  params = abstract.params
  names = jax.tree.leaves(param_paths(params))
  leaves = jax.tree.leaves(params)
  towers = {}
  for n, x in zip(names, leaves):
    towers[n.split("/")[0]] = towers.get(n.split("/")[0], 0) + math.prod(x.shape)
  result = {
      "mesh": dict(mesh_sizes), "devices": mesh.size, "global_batch": cfg.batch_size,
      "local_batch": local_batch, "parameters": sum(towers.values()), "by_tower": towers,
      "params_bytes": _bytes_per_device(params),
      "optimizer_bytes": _bytes_per_device(abstract.opt_state),
      # The input batch as training feeds it (batch_spec), split over data x fsdp.
      "batch_bytes": None,  # below, once the teacher is known
      "shardings": [(n, tuple(x.shape), str(x.dtype), tuple(x.sharding.spec),
                     math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize)
                    for n, x in zip(names, leaves)],
      # Dimensions the rules ask to split that the mesh does not divide (replicated instead).
      "undivided": partitioning.undivided(
          abstract_boxed_params(model, mesh, cfg.model.image.size), mesh, rules),
  }
  teacher = _teacher(cfg)
  result["batch_bytes"] = sum(math.prod(x.shape) * x.dtype.itemsize
                              for x in batch_spec(cfg, local_batch, teacher=teacher).values())
  if teacher is not None:
    shardings = param_shardings(teacher.module, teacher.image_size, mesh, rules)
    result["teacher"] = {
        "path": teacher.path,
        "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(teacher.params)),
        "bytes": _bytes_per_device(jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            teacher.params, shardings))}
  result.update(_one_device_program(cfg, model, tx, local_batch, compile_activations, teacher))
  return result


def _teacher(cfg):
  """The online distillation teacher on this machine's first device, or None."""
  d = cfg.loss.distill
  if not d.teacher or d.source != "online":
    return None
  one = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  own = None
  manifest = os.path.join(cfg.data.dir, "manifest.json")
  if os.path.isfile(manifest):  # planning away from the data: compare lengths only
    own = os.path.join(cfg.data.dir, sources.load_manifest(cfg.data.dir)["tokenizer"])
  return load_teacher(d.teacher, one, cfg.mesh.rules, own or tokenizer_path(d.teacher),
                      cfg.model.text.max_len)


def batch_spec(cfg, batch, sharding=None, teacher=None):
  """The train step's input as the data pipeline delivers it (uint8 pixels, normalised on the
  device by the image tower; int32 token ids), abstract."""
  s, n, k = cfg.model.image.size, cfg.model.text.max_len, cfg.data.hard_negatives
  spec = {"image": jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8, sharding=sharding),
          "text": jax.ShapeDtypeStruct((batch, n), jnp.int32, sharding=sharding)}
  if k:
    spec["neg_text"] = jax.ShapeDtypeStruct((batch, k, n), jnp.int32, sharding=sharding)
  if teacher is not None and teacher.own_tokens:
    spec["teacher_text"] = jax.ShapeDtypeStruct((batch, teacher.text_len), jnp.int32,
                                                sharding=sharding)
  return spec


def _one_device_program(cfg, model, tx, local_batch, compile_activations=True, teacher=None):
  """Matmul FLOPs (traced) and temporary memory (compiled) of one device's train step at the
  local batch.

  Tensor parallelism splits activations too, so the temporaries are divided by the tensor
  axis size in the report (an estimate; data and FSDP axes do not change them).
  """
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  loss = losses.get_loss(cfg.loss.name, cfg.loss)
  abstract, sh = state_shardings(model, tx, mesh, cfg.model.image.size, cfg.mesh.rules)
  batch = batch_spec(cfg, local_batch, partitioning.batch_sharding(mesh), teacher)
  distill = distill_options(cfg) if teacher is not None else None
  step = make_train_step(model, loss, tx, lambda i: 0.0, mesh, sh, cfg.optim.grad_accum_steps,
                         rules=cfg.mesh.rules, negatives=cfg.data.hard_negatives > 0,
                         distill=distill, teacher=teacher)
  teacher_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding),
                                teacher.params) if teacher is not None else {}
  with partitioning.activate(mesh, cfg.mesh.rules):
    traced = step.jitted.trace(abstract, batch, teacher_params)
    executed = jaxpr_matmul_flops(traced.jaxpr.jaxpr) / local_batch
    out = {"train_flops_per_example": executed}
    if cfg.model.remat != "none":
      # MFU counts the model's FLOPs, not the forward matmuls remat runs again: trace the same
      # step without remat for those, and keep the executed figure beside them.
      plain = model.clone(image=model.image.clone(remat="none"),
                          text=model.text.clone(remat="none"))
      plain_step = make_train_step(plain, loss, tx, lambda i: 0.0, mesh, sh,
                                   cfg.optim.grad_accum_steps, rules=cfg.mesh.rules,
                                   negatives=cfg.data.hard_negatives > 0, distill=distill,
                                   teacher=teacher)
      out["train_flops_per_example"] = jaxpr_matmul_flops(
          plain_step.jitted.trace(abstract, batch, teacher_params).jaxpr.jaxpr) / local_batch
      out["executed_flops_per_example"] = executed
    if teacher is not None:  # its forward pass alone, at the student's batch
      forward = jax.jit(lambda tp, b: teacher_embeddings(teacher, tp, b))
      out["teacher_flops_per_example"] = jaxpr_matmul_flops(
          forward.trace(teacher_params, batch).jaxpr.jaxpr) / local_batch
    if compile_activations:
      out["activation_bytes"] = traced.lower().compile().memory_analysis().temp_size_in_bytes
  return out


def format_plan(p, config_name):
  mesh = ",".join(f"{a}={p['mesh'][a]}" for a in AXES)
  tp = p["mesh"]["tensor"]
  lines = [f"{config_name} on mesh {mesh} ({p['devices']} devices): global batch "
           f"{p['global_batch']}, {p['local_batch']} per data-parallel device",
           f"parameters      {p['parameters'] / 1e6:,.1f}M  (" + ", ".join(
               f"{k} {v / 1e6:,.1f}M" for k, v in p["by_tower"].items()) + ")"]
  if "train_flops_per_example" in p:
    lines.append(f"train FLOPs     {p['train_flops_per_example'] / 1e9:,.1f} GFLOP per example "
                 "(forward + backward matmuls, traced" + (
                     f"; {p['executed_flops_per_example'] / 1e9:,.1f} run with remat's recompute"
                     if "executed_flops_per_example" in p else "") + ")")
  if "teacher" in p:
    lines.append(f"teacher         {p['teacher']['parameters'] / 1e6:,.1f}M parameters, frozen "
                 f"({p['teacher']['path']})" + (
                     f"; its forward pass is {p['teacher_flops_per_example'] / 1e9:,.2f} GFLOP "
                     "of the train FLOPs" if "teacher_flops_per_example" in p else ""))
  lines.append("memory per device")
  lines.append(f"  parameters    {p['params_bytes'] / GiB:8.3f} GiB")
  lines.append(f"  optimizer     {p['optimizer_bytes'] / GiB:8.3f} GiB")
  total = p["params_bytes"] + p["optimizer_bytes"] + p["batch_bytes"]
  if "teacher" in p:
    lines.append(f"  teacher       {p['teacher']['bytes'] / GiB:8.3f} GiB")
    total += p["teacher"]["bytes"]
  lines.append(f"  input batch   {p['batch_bytes'] / GiB:8.3f} GiB")
  if "activation_bytes" in p:
    act = p["activation_bytes"] / tp
    total += act
    lines.append(f"  activations   {act / GiB:8.3f} GiB  (XLA temporaries of one device's step"
                 + (f", / tensor={tp}" if tp > 1 else "") + ")")
  lines.append(f"  total         {total / GiB:8.3f} GiB")
  lines.append("parameter shardings (per-device bytes)")
  width = max(len(n) for n, *_ in p["shardings"])
  for name, shape, dtype, spec, nbytes in p["shardings"]:
    spec_s = "(" + ", ".join("-" if a is None else (a if isinstance(a, str) else "+".join(a))
                             for a in spec) + ")" if spec else "replicated"
    lines.append(f"  {name:<{width}}  {str(shape):<22} {spec_s:<28} {nbytes / 2**20:10.2f} MiB")
  if p.get("undivided"):
    lines.append("not sharded as the rules ask (mesh.rules; replicated on these dimensions)")
    lines += [f"  {partitioning.describe_undivided(r)}" for r in p["undivided"]]
  return "\n".join(lines)

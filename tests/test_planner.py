"""`jaxret inspect`: the plan against the compiled executable of the real sharded step."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT
from jaxret.parallel import partitioning
from jaxret.train import planner
from jaxret.experiment import Experiment, load_config
from jaxret.data.pipeline import train_iterator
from jaxret.train.flops import matmul_flops
from jaxret.train.loop import _global_batch, train_augment
from jaxret.train.step import make_train_step


# Large enough that activations, not fixed per-program buffers, dominate the temporaries.
SMALL = ("model.embed_dim=64", "model.image.width=64", "model.text.width=64",
         "model.image.depth=2", "model.text.depth=2", "model.image.mlp_dim=256",
         "model.text.mlp_dim=256", "batch_size=64")


@pytest.mark.parametrize("mesh", [{"data": 8, "fsdp": 1, "tensor": 1},
                                  {"data": 2, "fsdp": 4, "tensor": 1},
                                  {"data": 2, "fsdp": 2, "tensor": 2}])
def test_plan_matches_the_compiled_sharded_step(tiny_config, mesh):
  cfg = tiny_config("softmax", *SMALL, *(f"mesh.{k}={v}" for k, v in mesh.items()))
  exp = Experiment(cfg)  # the real thing, on 8 devices
  step = make_train_step(exp.model, exp.loss, exp.tx, exp.schedule, exp.mesh, exp.state_sh)
  # The batch the training loop feeds the step: the pipeline's rows made global.
  data = train_iterator(cfg.data.dir, batch_size=cfg.batch_size, text_len=cfg.model.text.max_len,
                        seed=0, image_size=cfg.model.image.size, augment=train_augment(cfg.data))
  real = _global_batch(exp.mesh, next(data))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in real.items()}
  local = cfg.batch_size // (mesh["data"] * mesh["fsdp"])
  assert {k: (v.shape[1:], v.dtype) for k, v in planner.batch_spec(cfg, local).items()} == \
      {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
  with partitioning.activate(exp.mesh):
    compiled = step.jitted.lower(exp.abstract_state, batch, {}).compile().memory_analysis()

  vocab = f"model.text.vocab_size={exp.tokenizer.vocab_size}"
  plan = planner.plan(tiny_config("softmax", *SMALL, vocab), mesh)  # abstract mesh: no devices
  # Parameters, optimizer state and the batch are the step's arguments, per device.
  planned = plan["params_bytes"] + plan["optimizer_bytes"] + plan["batch_bytes"]
  assert abs(planned - compiled.argument_size_in_bytes) <= 64
  if mesh["tensor"] == 1:
    # Activations: one device's program at the local batch vs the sharded program.
    assert plan["activation_bytes"] == pytest.approx(compiled.temp_size_in_bytes, rel=0.1)


def test_l14_on_256_chips_from_a_laptop():
  proc = subprocess.run(
      [sys.executable, "-m", "jaxret.cli", "inspect", "--config", "configs/clip.py:l14",
       "--mesh", "data=32,fsdp=8,tensor=1", "--no-compile",
       "--config.model.text.vocab_size=49408"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "(256 devices)" in out and "427.6M" in out
  # fp32 params split 8 ways by FSDP: at least 427,616,513 * 4 bytes / 8 per device, a little
  # more because small biases over the (size-1) tensor axis stay replicated.
  gib = float(re.search(r"parameters\s+([0-9.]+) GiB", out).group(1))
  assert 427_616_513 * 4 / 8 / 2**30 - 5e-4 <= gib <= 1.01 * 427_616_513 * 4 / 8 / 2**30
  assert "image/encoder/layers/block/mlp/fc1/kernel" in out and "(-, fsdp, tensor)" in out


def test_bad_mesh_is_one_line():
  from jaxret.errors import UserError
  with pytest.raises(UserError, match="AXIS=SIZE"):
    planner.parse_mesh("data=4,model=2")


def test_matmul_flops_multiplies_scanned_bodies_by_their_length():
  m, k, n, steps = 3, 5, 7, 11
  w = jax.ShapeDtypeStruct((steps, k, k), jnp.float32)
  x = jax.ShapeDtypeStruct((m, k), jnp.float32)
  v = jax.ShapeDtypeStruct((k, n), jnp.float32)

  def f(w, x, v):
    y, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)
    return jnp.sum(y @ v)
  forward = steps * 2 * m * k * k + 2 * m * k * n
  assert matmul_flops(f, w, x, v) == forward
  # Gradient in w and x: the forward plus, per matmul, one product for each input's cotangent
  # (x's own at the first layer is still computed inside the loop), none for v.
  grad = forward + steps * 2 * (2 * m * k * k) + 2 * m * k * n
  assert matmul_flops(jax.grad(f, argnums=(0, 1)), w, x, v) == grad


def analytic_train_flops(cfg, batch):
  """Independent reference: 2 FLOPs per matmul weight per token, plus attention's QK^T and AV
  (2 * 2 * tokens^2 * width per layer), the patch embedding and the heads; training is three
  forwards (the backward pass takes two matmuls per forward one). Per example."""
  def encoder(tokens, width, depth, mlp):
    return depth * (2 * tokens * (4 * width ** 2 + 2 * width * mlp) + 4 * tokens ** 2 * width)
  i, t, d = cfg.model.image, cfg.model.text, cfg.model.embed_dim
  patches = (i.size // i.patch_size) ** 2
  n_img = patches + (i.pool == "cls")
  fwd = 2 * patches * i.patch_size ** 2 * 3 * i.width + encoder(n_img, i.width, i.depth, i.mlp_dim)
  if i.pool == "map":  # one probe query over the tokens, then the MLP on that one token
    fwd += 2 * n_img * 2 * i.width ** 2 + 2 * 2 * i.width ** 2 + 4 * n_img * i.width
    fwd += 2 * 2 * i.width * i.mlp_dim
  fwd += encoder(t.max_len, t.width, t.depth, t.mlp_dim)
  per_token = cfg.loss.name == "filip"  # FILIP projects every token, not only the pooled one
  fwd += 2 * i.width * d * (n_img if per_token else 1) * cfg.model.image_proj
  fwd += 2 * t.width * d * (t.max_len if per_token else 1)
  fwd += 2 * batch * d  # the similarity matrix (FILIP's token-wise one is negligible at batch 2)
  return 3 * fwd


ZOO = [("configs/clip.py:b32", 49408), ("configs/clip.py:b16", 49408),
       ("configs/clip.py:l14", 49408), ("configs/siglip_b16.py", 32000),
       ("configs/filip.py:b32", 49408)]


@pytest.mark.parametrize("name,vocab", ZOO)
def test_train_flops_match_the_analytic_count(name, vocab):
  overrides = [f"model.text.vocab_size={vocab}", "batch_size=2", "model.remat=none"]
  cfg = load_config(os.path.join(ROOT, name), overrides)
  plan = planner.plan(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, compile_activations=False)
  expected = analytic_train_flops(cfg, 2)
  assert plan["train_flops_per_example"] == pytest.approx(expected, rel=0.1)
  if name.endswith("b32"):  # the layers unrolled count the same as the layers scanned
    unrolled = planner.plan(load_config(os.path.join(ROOT, name), overrides + ["model.scan=False"]),
                            {"data": 1, "fsdp": 1, "tensor": 1}, compile_activations=False)
    assert unrolled["train_flops_per_example"] == plan["train_flops_per_example"]
    # Remat leaves the model's FLOPs alone and reports the recomputed forward beside them.
    full = planner.plan(load_config(os.path.join(ROOT, name), overrides + ["model.remat=full"]),
                        {"data": 1, "fsdp": 1, "tensor": 1}, compile_activations=False)
    assert full["train_flops_per_example"] == plan["train_flops_per_example"]
    assert full["executed_flops_per_example"] > 1.2 * plan["train_flops_per_example"]

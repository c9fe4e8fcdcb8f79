"""`jaxret inspect`: the plan against the compiled executable of the real sharded step."""
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT
from jaxret.parallel import partitioning
from jaxret.train import planner
from jaxret.experiment import Experiment
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
  sh = partitioning.batch_sharding(exp.mesh)
  n, s, length = cfg.batch_size, cfg.model.image.size, cfg.model.text.max_len
  batch = {"image": jax.ShapeDtypeStruct((n, s, s, 3), jnp.float32, sharding=sh),
           "text": jax.ShapeDtypeStruct((n, length), jnp.int32, sharding=sh)}
  with partitioning.activate(exp.mesh):
    compiled = step.jitted.lower(exp.abstract_state, batch).compile().memory_analysis()

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

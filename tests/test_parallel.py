"""Sharding modes: data parallel, FSDP and FSDP + tensor parallel train exactly like one device."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxret.parallel.mesh import make_mesh
from jaxret.parallel.partitioning import fit_spec
from jaxret.experiment import Experiment
from jaxret.train.loop import train
from jaxret.workdir import read_metrics

STEPS = ("total_steps=4", "checkpoint.every=0", "optim.warmup_steps=1")


def losses(workdir):
  return [r["loss"] for r in read_metrics(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def one_device(tiny_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one"))
  train(tiny_config("softmax", *STEPS, "mesh.data=1"), workdir, progress=False,
        devices=jax.devices()[:1])
  return losses(workdir)


@pytest.mark.parametrize("mesh, sharded_axis", [
    ({"data": 8, "fsdp": 1, "tensor": 1}, None),        # DP: parameters replicated
    ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),      # FSDP: parameters split 8 ways
    ({"data": 2, "fsdp": 2, "tensor": 2}, "tensor"),    # FSDP + TP: heads and MLP split too
])
def test_sharding_modes_match_one_device(tiny_config, one_device, tmp_path, mesh, sharded_axis):
  overrides = [f"mesh.{k}={v}" for k, v in mesh.items()]
  cfg = tiny_config("softmax", *STEPS, *overrides)
  exp = Experiment(cfg)
  kernel = exp.state_sh.params["image"]["encoder"]["block00"]["mlp"]["fc1"]["kernel"]
  mu = exp.state_sh.opt_state[1][0].mu["image"]["encoder"]["block00"]["mlp"]["fc1"]["kernel"]
  # Mesh axes that really split the kernel (size-1 axes split nothing).
  axes = {a for a in jax.tree.leaves(tuple(kernel.spec)) if a and exp.mesh.shape[a] > 1}
  assert (sharded_axis in axes) if sharded_axis else not axes
  assert mu.spec == kernel.spec  # optimizer moments shard like their parameters
  train(cfg, str(tmp_path), progress=False)
  np.testing.assert_allclose(losses(str(tmp_path)), one_device, atol=1e-5, rtol=0)


def test_indivisible_dimensions_are_replicated():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert fit_spec(P("tensor", "fsdp"), (45, 32), mesh) == P(None, "fsdp")
  assert fit_spec(P(("data", "fsdp"), None), (8, 3), mesh) == P(("data", "fsdp"), None)
  assert fit_spec(P(("data", "fsdp")), (6,), mesh) == P(None)

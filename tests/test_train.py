"""Training end to end on the small demo data: resume exactness, data parallelism, outputs."""
import glob
import json
import math
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from jaxret.errors import UserError
from jaxret.eval import ranking
from jaxret.train.loop import train
from jaxret.optim import make_optimizer, make_schedule
from jaxret.param_rules import regex_mask
from jaxret.workdir import read_metrics


def losses_by_step(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def full_run(tiny_config, tmp_path_factory):
  """An uninterrupted 6-step softmax run on all 8 devices (shared by several tests)."""
  workdir = str(tmp_path_factory.mktemp("full"))
  result = train(tiny_config("softmax", "eval_every=3"), workdir, progress=False)
  return workdir, result


def test_resume_is_exact(tiny_config, full_run, tmp_path):
  """Stopped after step 3 (last checkpoint at 2) and rerun: every later loss is identical."""
  full_dir, _ = full_run
  cfg = tiny_config("softmax", "eval_every=3")
  assert train(cfg, str(tmp_path), stop_after_step=3, progress=False) is None
  assert max(losses_by_step(str(tmp_path))) == 3
  train(cfg, str(tmp_path), progress=False)
  want, got = losses_by_step(full_dir), losses_by_step(str(tmp_path))
  assert sorted(got) == list(range(1, 7))
  for step in range(1, 7):
    assert got[step] == want[step], (step, got[step], want[step])


def test_run_writes_metrics_tensorboard_checkpoints_and_eval(full_run):
  workdir, result = full_run
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
  assert all(r["examples_per_s"] > 0 for r in rows if "loss" in r)
  # Periodic evaluation at eval_every=3, and the final one.
  assert [r["step"] for r in rows if "eval/i2t_R@1" in r] == [3, 6]
  assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  # Every 2 steps, keeping the demo config's last 2.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  with open(os.path.join(workdir, "eval.json")) as f:
    saved = json.load(f)
  assert saved["num_pairs"] == 64 and set(saved["i2t"]) == {"R@1", "R@5", "R@10"}
  assert saved == json.loads(json.dumps(result))


@pytest.mark.parametrize("loss", ["sigmoid", "filip"])
def test_one_device_and_eight_devices_give_the_same_losses(tiny_config, tmp_path, loss):
  """Data parallelism over 8 devices (data=4, fsdp=2) matches one device, step by step."""
  eight = tiny_config(loss, "total_steps=3", "checkpoint.every=0", "mesh.data=4", "mesh.fsdp=2")
  one = tiny_config(loss, "total_steps=3", "checkpoint.every=0", "mesh.data=1")
  r8 = train(eight, str(tmp_path / "eight"), progress=False)
  r1 = train(one, str(tmp_path / "one"), progress=False, devices=jax.devices()[:1])
  l8, l1 = losses_by_step(str(tmp_path / "eight")), losses_by_step(str(tmp_path / "one"))
  for step in (1, 2, 3):
    assert abs(l8[step] - l1[step]) < 1e-5, (step, l8[step], l1[step])
  assert r8["i2t"] == r1["i2t"] and r8["t2i"] == r1["t2i"]


def test_workdir_of_a_different_model_is_refused(tiny_config, full_run, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(full_run[0], workdir)
  with pytest.raises(UserError, match="holds a run with model.image.width=32, and changing it to 64"):
    train(tiny_config("softmax", "model.image.width=64"), workdir, progress=False)
  # Without the saved config, the checkpoint's own parameter shapes catch it.
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(UserError, match="different model.*shape"):
    train(tiny_config("softmax", "model.image.width=64"), workdir, progress=False)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]


def test_missing_data_dir_is_one_line(tiny_config):
  with pytest.raises(UserError, match="no manifest.json.*jaxret data demo"):
    train(tiny_config("softmax", "data.dir=/nonexistent/data"), "/tmp/unused", progress=False)


def test_batch_must_split_over_devices(tiny_config, tmp_path):
  with pytest.raises(UserError, match="batch_size 12 must be divisible by the 8"):
    train(tiny_config("softmax", "batch_size=12"), str(tmp_path), progress=False)


def test_weight_decay_mask_follows_the_regex(tiny_config):
  """Decay on kernels and the token table only: never norms, biases, positions, t or b."""
  from jaxret.experiment import Experiment
  exp = Experiment(tiny_config("siglip"))
  mask = regex_mask(exp.abstract_state.params, exp.cfg.optim.decay_regex)
  flat = {"/".join(str(k.key) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = {k for k, v in flat.items() if v}
  assert "text/token_embedding/embedding" in decayed
  assert "image/patch_embed/kernel" in decayed
  assert "image/encoder/block00/attn/query_kernel" in decayed
  assert "image/map_head/mlp/fc1/kernel" in decayed
  for name in ("t", "b", "image/pos_embedding", "text/pos_embedding",
               "image/encoder/block00/ln1/scale", "image/encoder/block00/ln1/bias",
               "image/encoder/block00/mlp/fc1/bias", "image/map_head/probe"):
    assert name in flat and not flat[name], name
  # Behaviour: with zero gradients, only the masked-in leaves shrink.
  tx, _ = make_optimizer(exp.cfg.optim, exp.cfg.total_steps)
  params = {"w": {"kernel": np.ones((2, 2), np.float32)}, "ln": {"scale": np.ones(2, np.float32)}}
  state = tx.init(params)
  for _ in range(exp.cfg.optim.warmup_steps + 1):
    updates, state = tx.update(jax.tree.map(np.zeros_like, params), state, params)
  assert np.all(np.asarray(updates["w"]["kernel"]) < 0)
  assert np.all(np.asarray(updates["ln"]["scale"]) == 0)


def test_schedule_is_linear_warmup_then_cosine(tiny_config):
  cfg = tiny_config("softmax", "total_steps=100", "optim.warmup_steps=10", "optim.lr=1.0")
  s = make_schedule(cfg.optim, cfg.total_steps)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(55)) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)), abs=1e-6)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-7)
  assert isinstance(optax.global_norm({"a": np.ones(4)}), jax.Array)


def test_recall_matches_a_brute_force_loop():
  """The evaluator's dense ranks (FILIP exact scoring, and the reference for blocked ranks)
  and Recall@K against a plain loop, one caption per image."""
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(40, 40)).round(1)  # rounding makes ties
  scores[np.arange(40), np.arange(40)] += rng.uniform(0, 2, 40).round(1)
  n = np.arange(40)
  i2t_rank, t2i_rank = ranking.rank_dense(scores, n, n), ranking.rank_dense(scores.T, n, n)
  for i in range(40):
    # Pessimistic ties: every other candidate scoring >= the true one ranks above it.
    assert i2t_rank[i] == sum(scores[i, j] >= scores[i, i] for j in range(40) if j != i)
    assert t2i_rank[i] == sum(scores[j, i] >= scores[i, i] for j in range(40) if j != i)
  assert ranking.metrics(i2t_rank, ks=(1,))["R@1"] == np.mean([i2t_rank[i] == 0 for i in n])
  assert ranking.metrics(t2i_rank, ks=(5,))["R@5"] == np.mean([t2i_rank[i] < 5 for i in n])
  # Known answers: a perfect diagonal is always first; with every score tied, never.
  four = np.arange(4)
  assert ranking.metrics(ranking.rank_dense(np.eye(4), four, four), ks=(1,))["R@1"] == 1.0
  tied = ranking.metrics(ranking.rank_dense(np.ones((4, 4)), four, four), ks=(1, 4))
  assert (tied["R@1"], tied["R@4"]) == (0.0, 1.0)

"""A workdir written before the library layering (tests/fixtures/run_v0, made by
make_fixture.py there at commit 671ac2d) still evaluates to the recall it recorded, exports,
and resumes."""
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from jaxret import cli
from jaxret.workdir import load_run_config

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "run_v0")


@pytest.fixture
def legacy(tmp_path, monkeypatch):
  root = tmp_path / "run_v0"
  shutil.copytree(FIXTURE, root)
  monkeypatch.chdir(root)  # its config.json names data.dir relative to where it was trained
  return root


def test_legacy_workdir_evaluates_to_its_recorded_recall(legacy):
  with open(legacy / "workdir" / "eval.json") as f:
    recorded = json.load(f)
  os.remove(legacy / "workdir" / "eval.json")
  # Trained on a 2-device mesh: evaluate on 2 devices, in a process of its own.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", JAXRET_HUGEPAGES="0")
  subprocess.run([sys.executable, "-m", "jaxret.cli", "eval", "--workdir", "workdir"],
                 cwd=legacy, env=env, check=True, capture_output=True)
  with open(legacy / "workdir" / "eval.json") as f:
    now = json.load(f)
  assert now["step"] == recorded["step"] == 2
  for d in ("i2t", "t2i"):
    assert now[d] == pytest.approx(recorded[d], abs=1e-9)


def test_legacy_workdir_exports(legacy, capsys):
  import transformers
  cli.main(["export", "--workdir", "workdir", "--out", "hf"])
  assert "CLIPModel.from_pretrained" in capsys.readouterr().out
  _, info = transformers.CLIPModel.from_pretrained(str(legacy / "hf"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]


def test_legacy_workdir_resumes(legacy, capsys):
  from jaxret.train.loop import train
  cfg = load_run_config("workdir")
  cfg.total_steps = 3
  train(cfg, "workdir", progress=False, devices=jax.devices()[:2])
  assert "from step 2" in capsys.readouterr().out
  steps = sorted(int(s) for s in os.listdir(legacy / "workdir" / "checkpoints") if s.isdigit())
  assert steps[-1] == 3
  rows = [json.loads(line) for line in open(legacy / "workdir" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]

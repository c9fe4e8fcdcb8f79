"""The command line as a user runs it: bad input gives one line and exit status 2."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

JAXRET = os.path.join(os.path.dirname(sys.executable), "jaxret")


def run(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "jaxret.cli", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("jaxret: error:")]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  for n in needles:
    assert n in lines[0], lines[0]


def train_args(demo_dir, workdir, *overrides):
  return ["train", "--config", "configs/demo.py:softmax", "--workdir", str(workdir),
          *[f"--config.{o}" for o in TINY], f"--config.data.dir={demo_dir}",
          *[f"--config.{o}" for o in overrides]]


def test_console_command_is_installed():
  assert os.path.exists(JAXRET), "pip install -e . should create the `jaxret` command"
  proc = subprocess.run([JAXRET, "--help"], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and "train" in proc.stdout and "eval" in proc.stdout


def test_console_command_trains_with_worker_processes(demo_dir, tmp_path):
  """grain's spawned workers start under the installed `jaxret` entry point (no __main__
  guard of the user's)."""
  proc = subprocess.run([JAXRET, *train_args(demo_dir, tmp_path, "data.workers=2", "total_steps=3",
                                             "eval.tasks=('retrieval',)")],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  assert "R@1" in proc.stdout


def test_misspelled_key_suggests_the_nearest(demo_dir, tmp_path):
  proc = run(*train_args(demo_dir, tmp_path, "batch_sise=64"))
  assert_one_line_error(proc, "batch_sise", "did you mean 'batch_size'")
  assert not os.listdir(tmp_path)


def test_missing_data_path(tmp_path):
  proc = run("train", "--config", "configs/demo.py:softmax", "--workdir", str(tmp_path / "w"),
             "--config.data.dir=/no/such/dir")
  assert_one_line_error(proc, "/no/such/dir", "jaxret data demo")


def test_unknown_loss(tmp_path):
  proc = run("train", "--config", "configs/demo.py:sigmod", "--workdir", str(tmp_path))
  assert_one_line_error(proc, "unknown loss 'sigmod'", "did you mean 'sigmoid'")


def test_mesh_that_does_not_fit(demo_dir, tmp_path):
  proc = run(*train_args(demo_dir, tmp_path, "mesh.data=3"))
  assert_one_line_error(proc, "mesh data=3,fsdp=1,tensor=1", "needs 3 devices but 8")


def test_workdir_of_a_different_model(demo_dir, tiny_config, tmp_path):
  # A workdir that a run of another model wrote (its saved config is what the CLI checks
  # first; test_train covers the checkpoint-shape check behind it).
  (tmp_path / "config.json").write_text(tiny_config("softmax", "model.embed_dim=48").to_json())
  before = sorted(os.listdir(tmp_path))
  proc = run(*train_args(demo_dir, tmp_path))
  assert_one_line_error(proc, "holds a run with model.embed_dim=48, and changing it to 32")
  assert sorted(os.listdir(tmp_path)) == before
  assert json.loads((tmp_path / "config.json").read_text())["model"]["embed_dim"] == 48


@pytest.mark.parametrize("args, needle", [
    (["eval", "--workdir", "/no/such/run"], "no config.json"),
    (["train", "--config", "configs/nope.py", "--workdir", "/tmp/x"], "configs/nope.py"),
])
def test_other_bad_paths(args, needle):
  assert_one_line_error(run(*args), needle)

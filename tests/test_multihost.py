"""Two local processes under jax.distributed (4 CPU devices each) train exactly like one
process with 8 devices: same global batches, same losses, same evaluation."""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import ROOT, TINY
from jaxret.train.loop import train
from jaxret.workdir import read_metrics

STEPS = ["total_steps=3", "checkpoint.every=2"]


def test_two_processes_match_one_process(tiny_config, demo_dir, tmp_path):
  single = str(tmp_path / "single")
  train(tiny_config("softmax", *STEPS), single, progress=False)

  multi = str(tmp_path / "multi")
  env = dict(os.environ, JAXRET=f"{sys.executable} -m jaxret.cli", LOGDIR=str(tmp_path / "logs"))
  args = ["train", "--config", "configs/demo.py:softmax", "--workdir", multi, "--no-progress",
          *[f"--config.{o}" for o in TINY + STEPS], f"--config.data.dir={demo_dir}"]
  proc = subprocess.run(["bash", "launch/local_multihost.sh", "-n", "2", "-d", "4", "--", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  other = open(tmp_path / "logs" / "process_1.log").read()
  assert proc.returncode == 0, (proc.stdout[-3000:], other[-3000:])

  want = {r["step"]: r["loss"] for r in read_metrics(single) if "loss" in r}
  got = {r["step"]: r["loss"] for r in read_metrics(multi) if "loss" in r}
  assert sorted(got) == [1, 2, 3]
  for step in got:
    assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
  # Both processes wrote their grain iterator state into the shared checkpoint.
  files = sorted(os.listdir(os.path.join(multi, "checkpoints", "3", "data")))
  assert "process_0-of-2.json" in files and "process_1-of-2.json" in files
  with open(os.path.join(single, "eval.json")) as a, open(os.path.join(multi, "eval.json")) as b:
    ra, rb = json.load(a), json.load(b)
  for d in ("i2t", "t2i"):
    np.testing.assert_allclose(list(ra[d].values()), list(rb[d].values()), atol=1 / 64 + 1e-9)


def test_a_failing_process_stops_the_job(tmp_path):
  """A user mistake in a multi-host launch ends every process with the one-line error."""
  env = dict(os.environ, JAXRET=f"{sys.executable} -m jaxret.cli", LOGDIR=str(tmp_path))
  proc = subprocess.run(
      ["bash", "launch/local_multihost.sh", "-n", "2", "-d", "1", "--", "train", "--config",
       "configs/demo.py:softmax", "--workdir", str(tmp_path / "w"), "--config.batch_sise=8"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "did you mean 'batch_size'" in proc.stdout

"""benchmarks/device.sh, the accelerator script, run here at toy sizes (--smoke): it must work
end to end on whatever backend it finds, and write the tables it prints."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_script_runs_every_part_and_writes_its_tables(tmp_path):
  out = tmp_path / "device.md"
  env = {**os.environ, "PYTHON": sys.executable, "JAXRET_SITE": str(tmp_path / "site")}
  run = subprocess.run(["bash", str(ROOT / "benchmarks/device.sh"), "--smoke", "--out", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  assert "installing" not in run.stdout  # everything is here: nothing is put beside jax
  text = out.read_text()
  rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
  cells = {tuple(c.strip() for c in r[:2]) for r in rows}
  # The step ran with the CPU's one attention implementation at the smoke batch, with a rate.
  step = [r for r in rows if r[0].strip() == "xla"]
  assert step and float(step[0][2]) > 0 and float(step[0][3]) > 0
  for loss in ("softmax", "sigmoid", "filip"):
    for form in ("reference", "jaxret"):
      assert (loss, form) in cells, text
  timed = [r for r in rows if r[1].strip() in ("reference", "jaxret")]
  assert all(float(r[4]) > 0 for r in timed)  # every toy batch fits and is timed
  assert [r[0].strip() for r in rows if r[0].strip() in ("0", "1")] == ["0", "1"]  # workers
  assert "Ring moves:" in text  # what to run for them, or why not measured (one device)


def test_device_script_refuses_a_python_without_jax(tmp_path):
  fake = tmp_path / "python"
  fake.write_text("#!/bin/sh\nexit 1\n")
  fake.chmod(0o755)
  run = subprocess.run(["bash", str(ROOT / "benchmarks/device.sh")], capture_output=True,
                       text=True, env={**os.environ, "PYTHON": str(fake)}, timeout=60)
  assert run.returncode == 2 and "has no jax" in run.stdout

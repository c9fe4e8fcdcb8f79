"""Faults, injected into real training processes: SIGTERM (preemption), SIGKILL during an
async save, a diverging loss, a full disk, a second trainer, a corrupt latest checkpoint.
Each run is a `jaxret train` subprocess with async checkpoint saves (the default)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, TINY
from jaxret.errors import PREEMPTED_STATUS

OVERRIDES = TINY  # checkpoints saved asynchronously, the default
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def command(workdir, demo_dir, *overrides, python=(sys.executable, "-m", "jaxret.cli")):
  return [*python, "train", "--config", os.path.join(ROOT, "configs", "demo.py") + ":softmax",
          "--workdir", str(workdir), "--no-progress", f"--config.data.dir={demo_dir}",
          *[f"--config.{o}" for o in OVERRIDES + list(overrides)]]


def start(cmd):
  return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def losses(workdir):
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rows.append(json.loads(line))
  steps = [r["step"] for r in rows if "loss" in r]
  assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def wait_for_step(workdir, step, proc, timeout=180):
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    assert proc.poll() is None, proc.communicate()
    if os.path.exists(path) and max(losses(workdir), default=0) >= step:
      return
    time.sleep(0.05)
  raise AssertionError(f"no step {step} in {timeout} s")


def checkpoints(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


LONG = ["total_steps=100000", "checkpoint.every=1000", "optim.warmup_steps=10"]


def test_sigterm_saves_the_step_and_the_rerun_resumes_exactly(demo_dir, tmp_path):
  work, ref = tmp_path / "run", tmp_path / "ref"
  cmd = command(work, demo_dir, *LONG)
  a = start(cmd)
  wait_for_step(work, 3, a)
  # A second trainer on the same workdir is refused while the first runs.
  b = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
  assert b.returncode == 2 and f"in use by pid {a.pid}" in b.stderr, b.stderr[-2000:]
  t0 = time.time()
  a.send_signal(signal.SIGTERM)
  _, err = a.communicate(timeout=120)
  assert a.returncode == PREEMPTED_STATUS, err[-3000:]
  first = checkpoints(work)
  assert len(first) == 1 and first[0] >= 3, first
  assert f"stopped by SIGTERM at step {first[0]}" in err and "rerun the same command" in err
  print(f"SIGTERM to exit: {time.time() - t0:.1f} s")

  # Resume, and preempt again a few steps later (SIGINT this time, as Ctrl-C sends).
  a = start(cmd)
  wait_for_step(work, first[0] + 3, a)
  a.send_signal(signal.SIGINT)
  _, err = a.communicate(timeout=120)
  assert a.returncode == PREEMPTED_STATUS, err[-3000:]
  assert f"resuming" not in err
  last = max(checkpoints(work))
  assert last >= first[0] + 3

  # An uninterrupted run (same schedule) over the same steps: identical losses.
  r = start(command(ref, demo_dir, *LONG))
  wait_for_step(ref, last, r)
  r.send_signal(signal.SIGTERM)
  r.communicate(timeout=120)
  got, want = losses(work), losses(ref)
  assert sorted(got) == list(range(1, last + 1))
  for step in got:
    assert got[step] == want[step], (step, got[step], want[step])


def test_a_signal_to_one_process_saves_the_same_step_on_both(demo_dir, tmp_path):
  work = tmp_path / "multi"
  env = dict(ENV, JAXRET=f"{sys.executable} -m jaxret.cli", LOGDIR=str(tmp_path / "logs"))
  env.pop("XLA_FLAGS")
  args = command(work, demo_dir, *LONG, python=())
  job = subprocess.Popen(["bash", "launch/local_multihost.sh", "-n", "2", "-d", "1", "--",
                          *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  wait_for_step(work, 3, job)
  one = subprocess.run(["pgrep", "-f", f"{work} .*--process-id 1"], capture_output=True,
                       text=True).stdout.split()
  assert len(one) == 1, one
  os.kill(int(one[0]), signal.SIGTERM)
  out, _ = job.communicate(timeout=180)
  log1 = open(tmp_path / "logs" / "process_1.log").read()
  assert job.returncode == PREEMPTED_STATUS, (out[-3000:], log1[-3000:])
  steps = checkpoints(work)
  assert len(steps) == 1 and steps[0] >= 3
  step = steps[0]
  # Both processes wrote their data-iterator state into the same step's checkpoint.
  files = os.listdir(os.path.join(work, "checkpoints", str(step), "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(files)
  assert f"at step {step}" in out and f"at step {step}" in log1


# Sleeps before an async save's tmp folder is renamed into place: a reliable moment to kill.
SLOW_COMMIT = textwrap.dedent("""
    import asyncio, sys
    from orbax.checkpoint._src.path import atomicity
    original = atomicity.AtomicRenameTemporaryPath.finalize
    async def slow(self, *a, **k):
      if not str(self.get()).rstrip("/").endswith("/checkpoints/2"):
        await asyncio.sleep(30)
      return await original(self, *a, **k)
    atomicity.AtomicRenameTemporaryPath.finalize = slow
    from jaxret.cli import main
    sys.argv = ["jaxret"] + sys.argv[1:]
    main(sys.argv[1:])
""")


def test_kill_during_an_async_save_keeps_the_previous_checkpoint(demo_dir, tmp_path):
  work, ref = tmp_path / "run", tmp_path / "ref"
  steps = ["total_steps=6", "checkpoint.every=2", "checkpoint.keep=3"]
  a = start(command(work, demo_dir, *steps, python=(sys.executable, "-c", SLOW_COMMIT)))
  t0 = time.time()
  while not any(n.startswith("4.") for n in os.listdir(work / "checkpoints")
                ) if (work / "checkpoints").exists() else True:
    assert a.poll() is None and time.time() - t0 < 180, a.communicate()
    time.sleep(0.05)
  a.kill()  # SIGKILL while step 4 is being written
  a.wait()
  assert checkpoints(work) == [2]
  rerun = subprocess.run(command(work, demo_dir, *steps), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "from step 2" in rerun.stdout
  full = subprocess.run(command(ref, demo_dir, *steps), cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=300)
  assert full.returncode == 0
  got, want = losses(work), losses(ref)
  assert sorted(got) == list(range(1, 7)) and got == want


def test_a_diverging_run_stops_before_saving_and_keeps_the_last_good_checkpoint(demo_dir,
                                                                                 tmp_path):
  work = tmp_path / "run"
  steps = ["total_steps=40", "checkpoint.every=2", "optim.warmup_steps=0", "optim.lr=1e6",
           "optim.grad_clip_norm=0.0"]
  proc = subprocess.run(command(work, demo_dir, *steps), cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  msg = proc.stderr.strip().splitlines()[-1]
  assert "became non-finite at step" in msg
  bad = int(msg.split("at step ")[1].split(";")[0])
  good = checkpoints(work)
  assert good and max(good) < bad
  assert f"the latest checkpoint, step {max(good)}, is the last good one" in msg
  # The checkpoint named is finite (independently of the loop: read with orbax directly).
  import numpy as np
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(work / "checkpoints" / str(max(good)) / "state")
  assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(state))

  # Skipping instead: the updates are skipped and counted, and N in a row stop the run.
  work2 = tmp_path / "skip"
  proc = subprocess.run(command(work2, demo_dir, *steps, "optim.skip_nonfinite=3"), cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "3 updates in a row had a non-finite loss or gradient (skipped)" in proc.stderr
  rows = [json.loads(l) for l in open(work2 / "metrics.jsonl")]
  assert rows[-1]["optim/skipped_total"] >= 1


def _mount_tmpfs(path, size):
  """A small real filesystem to fill, where this machine lets us mount one (root)."""
  path.mkdir()
  if os.environ.get("JAXRET_TEST_NO_MOUNT"):  # to exercise the injected form here too
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


# Where a tmpfs can't be mounted: the same failure, injected where orbax writes the arrays.
NO_SPACE = textwrap.dedent("""
    import errno, os, sys
    from orbax.checkpoint._src.path import atomicity
    original = atomicity.AtomicRenameTemporaryPath.finalize
    async def full(self, *a, **k):
      if os.path.exists(os.environ["FAKE_DISK_FULL"]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
      return await original(self, *a, **k)
    atomicity.AtomicRenameTemporaryPath.finalize = full
    from jaxret.cli import main
    main(sys.argv[1:])
""")


def test_a_full_disk_is_one_line_and_loses_nothing(demo_dir, tmp_path):
  disk = tmp_path / "disk"
  mounted = _mount_tmpfs(disk, "8m")
  flag = tmp_path / "full"  # the injected form's switch
  python = (sys.executable, "-m", "jaxret.cli") if mounted else (sys.executable, "-c", NO_SPACE)
  env = dict(ENV, FAKE_DISK_FULL=str(flag))
  steps = ["checkpoint.every=2", "optim.warmup_steps=1", "eval.tasks=('retrieval',)"]

  def run(total):
    return subprocess.run(command(work, demo_dir, f"total_steps={total}", *steps, python=python),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  try:
    work = disk / "run"
    first = run(2)
    assert first.returncode == 0, first.stderr[-3000:]
    if mounted:
      st = os.statvfs(disk)
      with open(disk / "filler", "wb") as f:  # leave ~64 KiB: less than one checkpoint
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 64 * 1024))
    else:
      flag.touch()
    full = run(4)
    assert full.returncode == 2, full.stderr[-3000:]
    # orbax's writer threads log their own failures on the way; jaxret's verdict is one line.
    errors = [l for l in full.stderr.splitlines() if l.startswith("jaxret: error: ")]
    assert len(errors) == 1, full.stderr[-3000:]
    line = errors[0]
    assert "no space left on device" in line
    assert "the latest intact one is step 2" in line
    assert checkpoints(work) == [2]
    if mounted:
      os.remove(disk / "filler")
    else:
      flag.unlink()
    again = run(4)
    assert again.returncode == 0 and "from step 2" in again.stdout, again.stderr[-3000:]
    assert checkpoints(work) == [2, 4]
  finally:
    if mounted:
      subprocess.run(["umount", "-l", str(disk)])


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tiny_config, tmp_path,
                                                                  capsys):
  from jaxret.train.loop import train
  work = str(tmp_path / "run")
  train(tiny_config("softmax", "total_steps=4", "checkpoint.every=2", "checkpoint.keep=3"),
        work, progress=False)
  assert checkpoints(work) == [2, 4]
  # Truncate every array file of step 4 (a torn write by a dying disk or a bad copy).
  for root, _, files in os.walk(os.path.join(work, "checkpoints", "4", "state")):
    for name in files:
      if "/d" in root.replace(os.sep, "/") or name.startswith("manifest"):
        open(os.path.join(root, name), "wb").close()
  capsys.readouterr()
  train(tiny_config("softmax", "total_steps=6", "checkpoint.every=2", "checkpoint.keep=3"),
        work, progress=False)
  out = capsys.readouterr().out
  assert "checkpoint step 4" in out and "unreadable" in out and "from step 2" in out
  assert checkpoints(work) == [2, 4, 6]
  assert any(n.startswith("4.corrupt-") for n in os.listdir(os.path.join(work, "checkpoints")))

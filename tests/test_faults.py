"""Faults, injected into real training processes: SIGTERM and SIGINT (preemption), a signal
to one of two processes, SIGKILL during an async save, a second trainer. Each run is a
`jaxret train` subprocess with async checkpoint saves (the default). A diverging loss, a full
disk and a corrupt checkpoint are in test_faults_storage.py."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

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
  assert "resuming" not in err
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
      if "/checkpoints/4" in str(self.get()):  # step 4 and its items; step 2 goes through
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

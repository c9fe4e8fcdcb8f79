"""Faults in what a run writes: a diverging loss, a full disk, a corrupt latest checkpoint
(the signal and kill faults are in test_faults.py, whose helpers these tests share; two
files so that the two test workers share the load)."""
import json
import os
import subprocess
import sys
import textwrap

from conftest import ROOT
from test_faults import ENV, checkpoints, command


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

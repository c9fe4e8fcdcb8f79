"""Kill a demo training run at random moments and check it ends exactly where an
uninterrupted run ends.

  python benchmarks/faults.py                        # 20 kills, demo config to 300 steps
  python benchmarks/faults.py --kills 5 --steps 100  # a quicker look

Each attempt runs `jaxret train --config configs/demo.py:softmax` on the same workdir and is
killed after a random delay, SIGKILL or SIGTERM (alternately, starting at random), with
`checkpoint.every` small so many kills land during an async save. After the kills the command
runs to the end; a second workdir trains uninterrupted. The table reports the kills survived,
the steps lost per SIGKILL (steps logged before it, minus the step the next attempt resumed
from), the SIGTERM-to-exit time, and whether the final parameters are bit-identical.
Needs the demo data (`make demo-data`, or --data DIR).
"""
import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cmd(workdir, args):
  return [sys.executable, "-m", "jaxret.cli", "train", "--config",
          os.path.join(ROOT, "configs", "demo.py") + ":softmax", "--workdir", workdir,
          "--no-progress", f"--config.data.dir={args.data}",
          f"--config.total_steps={args.steps}", f"--config.checkpoint.every={args.every}",
          "--config.checkpoint.keep=2", "--config.log_every=1", "--config.eval.tasks=('retrieval',)"]


def logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  steps = []
  for line in open(path):
    try:
      steps.append(json.loads(line).get("step", 0))
    except ValueError:
      pass
  return max(steps, default=0)


def final_params(workdir, step):
  import jax
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                          "state"))
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--kills", type=int, default=20)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--every", type=int, default=10)
  p.add_argument("--data", default=os.path.join(ROOT, "demo_data"))
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  rng = random.Random(args.seed)
  tmp = tempfile.mkdtemp(prefix="jaxret-faults-")
  work, ref = os.path.join(tmp, "killed"), os.path.join(tmp, "ref")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  lost, term_s, survived, kinds = [], [], 0, []
  kind = rng.choice([signal.SIGKILL, signal.SIGTERM])
  for i in range(args.kills):
    before = logged(work)
    proc = subprocess.Popen(cmd(work, args), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # Wait for this attempt to train at least one step, then a random while longer.
    while logged(work) <= before and proc.poll() is None:
      time.sleep(0.02)
    if proc.poll() is not None:
      print(f"attempt {i} ended by itself (rc {proc.returncode}); stopping the kills")
      break
    resumed_from = before
    time.sleep(rng.uniform(0.0, 1.5))
    at = logged(work)
    t0 = time.time()
    proc.send_signal(kind)
    proc.communicate()
    kinds.append(kind.name)
    if kind == signal.SIGTERM:
      term_s.append(time.time() - t0)
      ok = proc.returncode == 143
    else:
      ok = proc.returncode == -9
    ckpts = [int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit()] \
        if os.path.isdir(os.path.join(work, "checkpoints")) else []
    last = max(ckpts, default=0)
    if kind == signal.SIGKILL:
      lost.append(max(0, at - last))
    survived += ok
    print(f"kill {i + 1:2d}: {kind.name} at step ~{at} (attempt resumed from {resumed_from}), "
          f"latest checkpoint {last}", flush=True)
    kind = signal.SIGTERM if kind == signal.SIGKILL else signal.SIGKILL
  end = subprocess.run(cmd(work, args), env=env, capture_output=True, text=True)
  assert end.returncode == 0, end.stderr[-2000:]
  full = subprocess.run(cmd(ref, args), env=env, capture_output=True, text=True)
  assert full.returncode == 0, full.stderr[-2000:]
  a, b = final_params(work, args.steps), final_params(ref, args.steps)
  identical = all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
  print()
  print("| kills | survived | SIGKILL: steps lost per kill (median / max) | SIGTERM to exit, s "
        "(median / max) | final params bit-identical |")
  print("|---|---|---|---|---|")
  print(f"| {len(kinds)} ({kinds.count('SIGKILL')} SIGKILL, {kinds.count('SIGTERM')} SIGTERM) | "
        f"{survived} | {statistics.median(lost) if lost else 0} / {max(lost, default=0)} | "
        f"{statistics.median(term_s) if term_s else 0:.1f} / {max(term_s, default=0):.1f} | "
        f"{'yes' if identical else 'NO'} |")
  shutil.rmtree(tmp, ignore_errors=True)
  sys.exit(0 if identical and survived == len(kinds) else 1)


if __name__ == "__main__":
  main()

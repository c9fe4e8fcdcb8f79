"""Divergence: a non-finite loss or gradient never becomes a checkpoint.

Each step reports `nonfinite` (loss or gradient norm not finite) as a device scalar; the flags
wait on the device and are read only when the loop saves or logs, so a step costs no extra
host sync. Before any save they are checked:
- default (`optim.skip_nonfinite=0`): any non-finite step stops the run, and the latest
  checkpoint, saved before it, stays the latest;
- `optim.skip_nonfinite=N`: the optimizer skips such updates (optax.apply_if_finite), they are
  counted (`optim/skipped_total`), and N in a row stop the run the same way.
"""
import jax
import numpy as np


class Diverged(FloatingPointError):
  pass


class Health:
  def __init__(self, skip_limit):
    self.skip_limit = skip_limit
    self.pending = []  # (step, device bool)
    self.in_a_row = 0
    self.total = 0

  def update(self, step, metrics):
    self.pending.append((step, metrics.pop("nonfinite")))

  def check(self, last_good):
    """Reads the pending flags; raises Diverged naming `last_good()` (the latest checkpoint)."""
    if not self.pending:
      return
    steps = [s for s, _ in self.pending]
    flags = np.asarray(jax.device_get([f for _, f in self.pending]), bool)
    self.pending = []
    for step, bad in zip(steps, flags):
      if not bad:
        self.in_a_row = 0
        continue
      self.total += 1
      self.in_a_row += 1
      if not self.skip_limit or self.in_a_row >= self.skip_limit:
        what = ("the loss or a gradient became non-finite" if not self.skip_limit else
                f"{self.in_a_row} updates in a row had a non-finite loss or gradient (skipped)")
        good = last_good()
        kept = (f"the latest checkpoint, step {good}, is the last good one and stays the latest"
                if good is not None else "no checkpoint was saved before it")
        fix = ("lower optim.lr, or set optim.skip_nonfinite=N to skip such steps"
               if not self.skip_limit else "lower optim.lr or check the data")
        raise Diverged(f"{what} at step {step}; nothing after it was saved: {kept}; {fix}, then "
                       "rerun the same command to resume")

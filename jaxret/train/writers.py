"""Where metrics go: `metrics.jsonl` (one JSON object per logged step) and TensorBoard event
files under `tb/`, both in the workdir. Only process 0 writes."""
import json
import os

import jax


class MetricWriter:
  def __init__(self, workdir, resume_step=0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._drop_rows_after(resume_step)
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def _drop_rows_after(self, step):
    """On resume, rows logged after the restored checkpoint are about to be recomputed."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(self.path, "w") as f:
      f.writelines(rows)

  def write(self, step, metrics):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _plain(v):
  if hasattr(v, "item"):
    return v.item()
  return v


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]

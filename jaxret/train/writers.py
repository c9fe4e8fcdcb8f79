"""Where metrics go: `metrics.jsonl` (one JSON object per logged step) and TensorBoard event
files under `tb/`, both in the workdir. Only process 0 writes.

After a resume from step S, both hold each step once: metrics.jsonl is rewritten without the
rows after S (atomically: a kill during the rewrite leaves the old file), and TensorBoard is
told to purge events after S (`purge_step`, a SessionLog.START that its reader honours). A
torn last line, left by a kill mid-write, is dropped.
"""
import json
import os
import time

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
    # purge_step: events of an earlier attempt at steps > resume_step are dropped on read.
    # The suffix keeps a writer opened within the same second as the last one (a quick resume)
    # from overwriting its file, and sorts after it, as TensorBoard reads files in name order.
    self._tb = SummaryWriter(os.path.join(workdir, "tb"),
                             purge_step=resume_step + 1 if resume_step else None,
                             filename_suffix=f".{time.time_ns():020d}")

  def _drop_rows_after(self, step):
    """On resume, rows logged after the restored checkpoint are about to be recomputed."""
    if not os.path.exists(self.path):
      return
    rows = [r for r in _rows(self.path) if r.get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)

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


def _rows(path):
  """The rows of a metrics.jsonl; a line that does not parse (torn by a kill) is dropped."""
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        continue
  return out


def read_metrics(workdir):
  return _rows(os.path.join(workdir, "metrics.jsonl"))

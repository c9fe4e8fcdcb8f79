"""Where metrics go: `metrics.jsonl` (one JSON object per logged step) and TensorBoard event
files under `tb/`, both in the workdir. Only process 0 writes.

After a resume from step S, both hold each step once: metrics.jsonl is rewritten without the
rows after S (atomically: a kill during the rewrite leaves the old file), and TensorBoard is
told to purge events after S (`purge_step`, a SessionLog.START that its reader honours). A
torn last line, left by a kill mid-write, is dropped.

In a bucket (gs://), where objects can't be appended to, each write uploads the whole
metrics.jsonl again: a reader sees the same single file as on disk, every row is stored as soon
as it is logged, and the object stays small (a few hundred bytes a row; per-flush part files
would need merging by every reader). TensorBoard event files are written locally and uploaded
whole after each write and at the end (tensorboardX's own gs:// writer, through
google-cloud-storage, does the same from memory, but uploads again from `__del__`, whenever the
garbage collector gets to it); the events of the last few writes may reach the bucket one write
late.
"""
import json
import os
import shutil
import tempfile
import time

import jax

from jaxret import storage
from jaxret.workdir import read_jsonl


class MetricWriter:
  def __init__(self, workdir, resume_step=0):
    self.enabled = jax.process_index() == 0
    self.path = storage.join(workdir, "metrics.jsonl")
    self._tb = None
    self._remote = storage.is_remote(workdir)
    self._tb_dir = storage.join(workdir, "tb")
    self._tb_local = None  # a bucket's event files, written here first
    self._rows = []  # a bucket's metrics.jsonl, uploaded whole on each write
    if not self.enabled:
      return
    storage.makedirs(workdir)
    self._drop_rows_after(resume_step)
    from tensorboardX import SummaryWriter
    if self._remote:
      self._tb_local = tempfile.mkdtemp(prefix="jaxret-tb-")
    # purge_step: events of an earlier attempt at steps > resume_step are dropped on read.
    # The suffix keeps a writer opened within the same second as the last one (a quick resume)
    # from overwriting its file, and sorts after it, as TensorBoard reads files in name order.
    self._tb = SummaryWriter(self._tb_local or self._tb_dir,
                             purge_step=resume_step + 1 if resume_step else None,
                             filename_suffix=f".{time.time_ns():020d}")

  def _drop_rows_after(self, step):
    """On resume, rows logged after the restored checkpoint are about to be recomputed."""
    if not storage.exists(self.path):
      return
    rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
    if self._remote:
      self._rows = rows
    storage.write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

  def write(self, step, metrics):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    if self._remote:
      self._rows.append(row)
      storage.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self._rows))
    else:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()
    self._upload_tb()

  def _upload_tb(self):
    if self._tb_local is not None:
      for name in os.listdir(self._tb_local):
        with open(os.path.join(self._tb_local, name), "rb") as f:
          storage.write_bytes(storage.join(self._tb_dir, name), f.read())

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._upload_tb()
    if self._tb_local is not None:
      shutil.rmtree(self._tb_local, ignore_errors=True)
      self._tb_local = None


def _plain(v):
  if hasattr(v, "item"):
    return v.item()
  return v

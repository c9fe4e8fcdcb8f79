"""The workdir lock and the metric writers after a resume (unit level; tests/test_faults.py
kills real training processes)."""
import json
import os
import socket
import struct
import subprocess
import sys

import pytest

from jaxret import lock
from jaxret.errors import UserError
from jaxret.train.writers import MetricWriter
from jaxret.workdir import read_metrics


def test_a_second_owner_is_refused_and_the_first_releases(tmp_path):
  first = lock.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on {socket.gethostname()}"):
    lock.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  assert not (tmp_path / "lock").exists()
  with lock.WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  pid = int(dead.stdout)  # exited: its pid is (almost surely) free now
  (tmp_path / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                              "boot_id": lock._boot_id()}))
  lock.WorkdirLock(str(tmp_path)).acquire()
  assert f"from pid {pid}" in capsys.readouterr().out
  assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()


def test_a_lock_from_before_a_reboot_is_taken_over(tmp_path):
  # A live pid, but another boot id: the pid was reused after a reboot.
  (tmp_path / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 1,
                                              "boot_id": "another-boot"}))
  lock.WorkdirLock(str(tmp_path)).acquire()
  assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()


def test_a_lock_on_another_host_is_refused(tmp_path):
  (tmp_path / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "boot_id": "x"}))
  with pytest.raises(UserError, match="on elsewhere"):
    lock.WorkdirLock(str(tmp_path)).acquire()


def _tb_records(path):
  """TFRecord framing: u64 length, u32 crc, payload, u32 crc."""
  data = open(path, "rb").read()
  i, out = 0, []
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(data[i + 12:i + 12 + n])
    i += 12 + n + 4
  return out


def _tensorboard_view(tb_dir):
  """Scalars as TensorBoard shows them: a SessionLog.START at step s purges the events at
  steps >= s read before it (tensorboard's event_accumulator._CheckForRestartAndMaybePurge)."""
  from tensorboardX.proto import event_pb2
  seen = []
  for name in sorted(os.listdir(tb_dir)):  # file names start with the creation time
    for rec in _tb_records(os.path.join(tb_dir, name)):
      ev = event_pb2.Event.FromString(rec)
      if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
        seen = [(s, t, v) for s, t, v in seen if s < ev.step]
      elif ev.HasField("summary"):
        seen += [(ev.step, v.tag, v.simple_value) for v in ev.summary.value]
  return seen


def test_after_a_resume_each_step_is_logged_once(tmp_path):
  w = MetricWriter(str(tmp_path))
  for step in range(1, 6):
    w.write(step, {"loss": float(step)})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # a kill mid-line
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
  # Resumed from the checkpoint at step 3: steps 4.. are recomputed with other values.
  w = MetricWriter(str(tmp_path), resume_step=3)
  for step in range(4, 8):
    w.write(step, {"loss": 10.0 * step})
  w.close()
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
  assert [r["loss"] for r in rows] == [1, 2, 3, 40, 50, 60, 70]
  tb = [(s, v) for s, t, v in _tensorboard_view(str(tmp_path / "tb")) if t == "loss"]
  assert tb == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0), (7, 70.0)]


def test_without_purge_tensorboard_would_show_steps_twice(tmp_path):
  """A positive control for the reader above: two writers with no purge step overlap."""
  from tensorboardX import SummaryWriter
  for i, values in enumerate(((1.0, 2.0), (3.0, 4.0))):
    w = SummaryWriter(str(tmp_path), filename_suffix=f".{i}")
    for step, v in enumerate(values, 1):
      w.add_scalar("loss", v, step)
    w.close()
  assert len(_tensorboard_view(str(tmp_path))) == 4


def test_plot_reads_metrics_with_a_torn_last_line(tmp_path):
  from jaxret.eval.plots import plot_workdir
  rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "examples_per_s": 100.0}
          for s in range(1, 5)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                          + '{"step": 5, "lo')
  assert [os.path.basename(p) for p in plot_workdir(str(tmp_path))] == ["training.png"]
  assert (tmp_path / "plots" / "training.png").stat().st_size > 0

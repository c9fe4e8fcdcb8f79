"""Workdirs in a bucket (`--workdir gs://...`) against a local GCS server (tests/gcs_emulator.py):
a run stopped and resumed there, `jaxret eval|plot|export` and `jaxret.load` reading it, the
lock as an object with a lease, and data in a bucket refused with one line.

What is in the bucket is listed and read with google-cloud-storage, not the code under test.
"""
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import jaxret
from conftest import ROOT, TINY
from jaxret import cli as jaxret_cli
from jaxret.errors import UserError
from jaxret.lock import WorkdirLock


def cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxret.cli", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def train_args(demo_dir, workdir):
  return ["train", "--config", "configs/demo.py:softmax", "--workdir", workdir, "--no-progress",
          *[f"--config.{o}" for o in TINY], f"--config.data.dir={demo_dir}"]


def bucket(url):
  from google.cloud import storage
  name, _, prefix = url[len("gs://"):].partition("/")
  return storage.Client().bucket(name), prefix + "/"


def objects(url):
  """{name under url: bytes} of every object below gs://BUCKET/PREFIX."""
  b, prefix = bucket(url)
  return {blob.name[len(prefix):]: blob.download_as_bytes()
          for blob in b.client.list_blobs(b, prefix=prefix)}


def rows(data):
  return [json.loads(line) for line in data.decode().splitlines()]


def loss_events(data):
  """(step, value) of the 'loss' scalars and the steps of SessionLog.START (TensorBoard's purge
  marks) in one event file: TFRecord framing (length, crc, payload, crc) of Event protos."""
  from tensorboardX.proto.event_pb2 import Event, SessionLog
  losses, starts, pos = [], [], 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    event = Event.FromString(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    if event.HasField("session_log") and event.session_log.status == SessionLog.START:
      starts.append(event.step)
    losses += [(event.step, v.simple_value) for v in event.summary.value if v.tag == "loss"]
  return losses, starts


@pytest.fixture(scope="module")
def bucket_run(gcs_bucket, tiny_config, demo_dir):
  """A tiny run in gs://BUCKET/run: first in this process, stopped after step 3 without saving,
  as a kill would (the last checkpoint is step 2); then resumed to step 6 by `jaxret train`
  (asynchronous saves, the default)."""
  from jaxret.train.loop import train
  workdir = f"{gcs_bucket}/run"
  assert train(tiny_config("softmax"), workdir, stop_after_step=3, progress=False) is None
  first = objects(workdir)
  proc = cli(*train_args(demo_dir, workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, first, proc


def test_a_run_in_a_bucket_stops_and_resumes_exactly(bucket_run):
  workdir, first, proc = bucket_run
  assert f"resuming {workdir} from step 2" in proc.stdout
  got = objects(workdir)
  assert {"config.json", "metrics.jsonl", "eval.json"} <= set(got)
  assert "lock" not in got  # released at the end
  # Every 2 steps, keeping the demo config's last 2; orbax's commit marker in each.
  steps = {name.split("/")[1] for name in got if name.startswith("checkpoints/")}
  assert steps == {"4", "6"}, steps
  assert all(any(n.startswith(f"checkpoints/{s}/state/") for n in got) for s in steps)
  # metrics.jsonl: each step once; step 3, recomputed from checkpoint 2, is the same as the
  # first attempt's step 3 (the data iterator and state were restored exactly).
  before = {r["step"]: r["loss"] for r in rows(first["metrics.jsonl"]) if "loss" in r}
  after = rows(got["metrics.jsonl"])
  assert sorted(before) == [1, 2, 3]
  assert [r["step"] for r in after if "loss" in r] == [1, 2, 3, 4, 5, 6]
  by_step = {r["step"]: r["loss"] for r in after if "loss" in r}
  assert by_step[1] == before[1] and by_step[3] == before[3]
  assert json.loads(got["eval.json"])["step"] == 6
  # TensorBoard: one event file per start; the second purges steps after 2 and logs 3-6.
  tb = sorted(name for name in got if name.startswith("tb/events.out.tfevents."))
  assert len(tb) == 2, tb
  (loss1, starts1), (loss2, starts2) = (loss_events(got[name]) for name in tb)
  assert [s for s, _ in loss1] == [1, 2, 3] and starts1 == []
  assert [s for s, _ in loss2] == [3, 4, 5, 6] and starts2 == [3]
  assert np.allclose([v for _, v in loss2], [by_step[s] for s in (3, 4, 5, 6)])
  # Nothing went to a local folder named after the URL (what os.path.abspath made of it).
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_eval_plot_export_and_load_read_the_bucket(bucket_run, tmp_path):
  workdir = bucket_run[0]
  b, prefix = bucket(workdir)
  b.blob(prefix + "eval.json").delete()
  # The commands in this process (the trainer above ran as a subprocess).
  jaxret_cli.main(["eval", "--workdir", workdir])
  got = objects(workdir)
  assert json.loads(got["eval.json"])["step"] == 6
  for png in ("plots/recall_at_k.png", "plots/training.png"):
    assert got[png].startswith(b"\x89PNG\r\n\x1a\n"), png
  b.blob(prefix + "plots/training.png").delete()
  jaxret_cli.main(["plot", "--workdir", workdir])
  assert objects(workdir)["plots/training.png"].startswith(b"\x89PNG")

  out = str(tmp_path / "hf")
  jaxret_cli.main(["export", "--workdir", workdir, "--out", out])
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
  # The bucket's workdir and its export (a second path: transformers layout, read back) embed
  # alike.
  texts = ["a white coat above a green shirt", "a yellow ankle boot"]
  images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  from_bucket, exported = jaxret.load(workdir), jaxret.load(out)
  assert from_bucket.step == 6
  for a, b_ in ((from_bucket.encode_texts(texts), exported.encode_texts(texts)),
                (from_bucket.encode_images(images), exported.encode_images(images))):
    assert float(np.abs(np.asarray(a) - np.asarray(b_)).max()) < 1e-4


def test_a_second_trainer_on_a_bucket_workdir_is_refused(gcs_bucket, demo_dir):
  workdir = f"{gcs_bucket}/busy"
  with WorkdirLock(workdir):
    proc = cli(*train_args(demo_dir, workdir))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("jaxret: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"in use by pid {os.getpid()}" in lines[0] and f"{workdir}/lock" in lines[0]
    assert set(objects(workdir)) == {"lock"}  # refused before writing anything
  assert objects(workdir) == {}


def test_a_lock_whose_lease_expired_is_taken_over(gcs_bucket):
  workdir = f"{gcs_bucket}/stale"
  b, prefix = bucket(workdir)
  dead = {"host": "a-preempted-vm", "pid": 4242, "since": "earlier", "lease_s": 1}
  b.blob(prefix + "lock").upload_from_string(json.dumps(dead))
  with pytest.raises(UserError, match="in use by pid 4242 on a-preempted-vm"):
    WorkdirLock(workdir).acquire()  # its lease is fresh: the owner may be alive
  time.sleep(1.5)
  lock = WorkdirLock(workdir, lease_s=0.4).acquire()
  try:
    owner = b.get_blob(prefix + "lock")
    assert json.loads(owner.download_as_bytes())["pid"] == os.getpid()
    time.sleep(0.6)  # the holder refreshes its lease every lease/4
    assert b.get_blob(prefix + "lock").generation != owner.generation
  finally:
    lock.release()
  assert b.get_blob(prefix + "lock") is None


def test_data_in_a_bucket_is_refused_with_one_line(tiny_config, bucket_run, tmp_path):
  with pytest.raises(UserError, match="gcsfuse") as e:
    tiny_config("softmax", "data.dir=gs://bucket/records")
  assert "data.dir 'gs://bucket/records'" in str(e.value) and "\n" not in str(e.value)
  from jaxret.eval.run import evaluate_workdir
  with pytest.raises(UserError, match="gcsfuse"):
    evaluate_workdir(bucket_run[0], data_dir="gs://bucket/records")
  from jaxret.export.hf import export_workdir
  with pytest.raises(UserError, match="writes a local folder"):
    export_workdir(bucket_run[0], "gs://bucket/hf")

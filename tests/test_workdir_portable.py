"""A workdir is self-contained: it carries its tokenizer, its data's manifest and provenance,
stores data.dir absolute, and evaluates and exports without the training data's folder, on
any number of devices, whatever mesh trained it."""
import hashlib
import json
import os
import shutil

import jax
import pytest

from jaxret.data.tokenizer_training import train_bpe
from jaxret.eval.run import evaluate_workdir
from jaxret.train.loop import train


@pytest.fixture(scope="module")
def sharded_run(tiny_config, demo_dir, tmp_path_factory):
  """Trained on 8 devices with data=2, fsdp=2, tensor=2, from a relative data.dir."""
  root = tmp_path_factory.mktemp("portable")
  data = root / "data"
  shutil.copytree(demo_dir, data)
  workdir = root / "run"
  cfg = tiny_config("softmax", "total_steps=3", "checkpoint.every=0", "mesh.data=2",
                    "mesh.fsdp=2", "mesh.tensor=2", "eval.tasks=('retrieval',)")
  with cfg.unlocked():
    cfg.data.dir = "data"
  here = os.getcwd()
  os.chdir(root)
  try:
    result = train(cfg, "run", progress=False)
  finally:
    os.chdir(here)
  return str(workdir), str(data), result


def test_workdir_holds_tokenizer_manifest_provenance_and_absolute_data_dir(sharded_run):
  workdir, data, _ = sharded_run
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data"]["dir"] == data
  with open(os.path.join(data, "manifest.json"), "rb") as f:
    raw = f.read()
  manifest = json.loads(raw)
  with open(os.path.join(workdir, "data_manifest.json")) as f:
    assert json.load(f) == manifest
  with open(os.path.join(data, manifest["tokenizer"]), "rb") as a, \
       open(os.path.join(workdir, "tokenizer", manifest["tokenizer"]), "rb") as b:
    assert a.read() == b.read()
  with open(os.path.join(workdir, "provenance.json")) as f:
    starts = json.load(f)["starts"]
  assert len(starts) == 1
  p = starts[0]
  assert p["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
  assert p["versions"]["jax"] == jax.__version__ and "jaxret" in p["versions"]
  assert p["data_dir"] == data and p["device_count"] == 8 and p["command"]
  assert p["jaxret_commit"] is None or len(p["jaxret_commit"].split("+")[0]) == 40


def test_evaluates_on_one_and_two_devices_with_the_training_recall(sharded_run):
  workdir, _, trained = sharded_run
  for n in (1, 2):
    got = evaluate_workdir(workdir, devices=jax.devices()[:n])
    assert got["i2t"] == trained["i2t"] and got["t2i"] == trained["t2i"], n


def test_eval_data_dir_uses_the_runs_tokenizer(sharded_run, tmp_path):
  """The other data set ships a different tokenizer; the run's own one is what it reads."""
  workdir, data, trained = sharded_run
  other = tmp_path / "other"
  shutil.copytree(data, other)
  name = json.loads((other / "manifest.json").read_text())["tokenizer"]
  train_bpe(["zebra quartz violin " * 3, "glacier mango"], other / name, vocab_size=600,
            min_frequency=1)
  got = evaluate_workdir(workdir, data_dir=str(other), devices=jax.devices()[:1])
  assert got["i2t"] == trained["i2t"] and got["t2i"] == trained["t2i"]


def test_export_needs_only_the_workdir(sharded_run, tmp_path):
  import transformers
  from jaxret.export.hf import export_workdir
  workdir, data, _ = sharded_run
  moved = tmp_path / "run"
  shutil.copytree(workdir, moved)
  with open(moved / "config.json") as f:
    cfg = json.load(f)
  cfg["data"]["dir"] = str(tmp_path / "no-such-data")  # the training data is gone
  (moved / "config.json").write_text(json.dumps(cfg))
  out = tmp_path / "hf"
  export_workdir(str(moved), str(out))
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert tok("a red sneaker")["input_ids"]

"""Evaluation on any converted data: default tasks that run everywhere (zero-shot skipped, with
one line, where no classes are known), zero-shot classes from a class file or a TFDS source's
label names, named evaluation sets each equal to that set evaluated alone, and every check
against the data done before step 1."""
import contextlib
import io
import json
import os

import msgpack
import numpy as np
import pytest
from PIL import Image

from jaxret import config
from jaxret.data import classes, convert, sources
from jaxret.errors import UserError

from conftest import ROOT, TINY

CLASSES = ("cat", "dog", "car")
SIZE = 64


def png(seed, tint):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 120, (40, 48, 3)).astype(np.uint8)
  pixels[..., tint] += 120  # a class colour, so the classes differ a little
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
  """24 images in class folders (img/cat/0.png ...), two captions each; no classes in the
  manifest. -> (data dir, [class index of each record, in record order])."""
  root = tmp_path_factory.mktemp("folder")
  rows, labels = [], []
  for c, name in enumerate(CLASSES):
    (root / "img" / name).mkdir(parents=True)
    for i in range(8):
      (root / "img" / name / f"{i}.png").write_bytes(png(10 * c + i, c))
      rows.append({"image": f"{name}/{i}.png",
                   "captions": [f"a {name} number {i}", f"picture {i} of one {name}"]})
      labels.append(c)
  (root / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = root / "data"
  convert.convert(out, split="train", images=root / "img", captions=root / "caps.jsonl",
                  image_size=SIZE, vocab_size=700, workers=1, progress=False)
  return str(out), labels


def check_tfds_labels(out_dir, source, split):
  """`data convert --tfds` stores each example's ClassLabel index as meta "label"."""
  from array_record.python.array_record_module import ArrayRecordReader
  manifest = sources.load_manifest(out_dir)
  for name in manifest["splits"][split]["files"]:
    reader = ArrayRecordReader(os.path.join(out_dir, name))
    records = [msgpack.unpackb(r) for r in reader.read_all()]
    reader.close()
    for r in records:
      assert r["meta"]["label"] == int(
          source[int(r["meta"]["source"].rsplit(":", 1)[1])]["label"])


@pytest.fixture(scope="module")
def tfds_data(tmp_path_factory):
  """A tiny TFDS image-classification set with captions, prepared here (ArrayRecord, no
  download), converted as split 'test'; its tokenizer file is then broken, so evaluation
  can only work with the run's. -> (data dir, [label of each record])."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyLabeled(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=list(CLASSES)),
          "captions": tfds.features.Sequence(tfds.features.Text())}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(12):
        yield i, {"image": png(100 + i, i % 3), "label": i % 3,
                  "captions": [f"a {CLASSES[i % 3]} seen {i}", f"image {i}"]}

  root = tmp_path_factory.mktemp("tfds")
  builder = TinyLabeled(data_dir=str(root / "tfds"), file_format="array_record")
  builder.download_and_prepare()
  out = str(root / "data")
  convert.convert(out, split="test", tfds=builder.data_dir, tfds_split="train",
                  image_size=SIZE, vocab_size=700, workers=1, progress=False)
  source = builder.as_data_source("train")
  check_tfds_labels(out, source, "test")
  with open(os.path.join(out, "tokenizer.json"), "w") as f:
    f.write("not a tokenizer")
  return out, [int(source[i]["label"]) for i in range(len(source))]


@pytest.fixture(scope="module")
def run(folder_data, tmp_path_factory):
  """A 3-step CLIP run on the converted folder data with the default eval tasks.
  -> (workdir, config, result, what it printed)."""
  from jaxret.experiment import load_config
  from jaxret.train.loop import train
  data_dir, _ = folder_data
  cfg = load_config(os.path.join(ROOT, "configs", "demo.py") + ":softmax",
                    TINY + [f"data.dir={data_dir}", "data.eval_split=train", "total_steps=3",
                            "batch_size=8", "optim.warmup_steps=1", "checkpoint.every=0",
                            # the library's defaults (the demo adds compositional)
                            f"eval.tasks={tuple(config.defaults().eval.tasks)!r}"])
  assert tuple(cfg.eval.tasks) == config.defaults().eval.tasks
  workdir = str(tmp_path_factory.mktemp("run"))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = train(cfg, workdir, progress=False)
  return workdir, cfg, result, out.getvalue()


def evaluate(cfg, workdir, *overrides):
  """(evaluator, params, the result) of the run's last checkpoint under `cfg` + overrides."""
  from jaxret.eval.suite import build_evaluator
  from jaxret.experiment import Experiment
  from jaxret.workdir import restore_params
  cfg = cfg.copy_and_resolve_references()
  for item in overrides:
    config.apply_override(cfg, item)
  config.validate(cfg)
  exp = Experiment(cfg)
  params, step = restore_params(exp.abstract_state, workdir)
  ev = build_evaluator(exp)
  return ev, params, ev(params, step)


def naive_top1(ev, params, image_emb, names, template, labels):
  """Top-1 of prompt embeddings (one template: no averaging) against known labels."""
  text = ev.embed(params, "text", ev.tokenizer.encode_batch([template.format(n) for n in names]))
  text = text["text_emb"] / np.linalg.norm(text["text_emb"], axis=-1, keepdims=True)
  return float(np.mean(np.argmax(image_emb @ text.T, axis=1) == np.asarray(labels)))


# --- retrieval and zero-shot on converted data ------------------------------------------------


def test_default_tasks_run_on_converted_data(run, folder_data):
  workdir, cfg, result, printed = run
  assert "classes" not in sources.load_manifest(folder_data[0])
  assert result["num_images"] == 24 and result["num_captions"] == 48
  assert {"pooled", "pooled_qb_norm", "pooled_db_norm"} <= set(result["retrieval"])
  assert "zeroshot" not in result
  line = (f"eval: skipping zeroshot: data '{folder_data[0]}' has no classes (set "
          "eval.zeroshot_classes)")
  assert printed.splitlines().count(line) == 1
  assert result["skipped"] == {"zeroshot": line.split(": ", 2)[2]}
  with open(os.path.join(workdir, "eval.json")) as f:
    saved = json.load(f)
  assert saved["i2t"] == result["i2t"] and "sets" not in saved  # the one-set layout


def test_zeroshot_from_a_class_file_and_image_folders(run, folder_data, tmp_path):
  workdir, cfg, _, _ = run
  class_file = tmp_path / "classes.txt"
  # KEY<TAB>NAME: records say 'dog' (their folder), prompts say 'puppy'
  class_file.write_text("# three classes\ncat\ndog\tpuppy\n\ncar\n")
  ev, params, result = evaluate(cfg, workdir, f"eval.zeroshot_classes={class_file}",
                                "eval.tasks=('retrieval','zeroshot')")
  zs = result["zeroshot"]
  assert (zs["num_classes"], zs["num_templates"]) == (3, 1) and "skipped" not in result
  assert zs["image"]["num_images"] == 24 and set(zs["image"]) == {"top1", "chance", "num_images"}
  assert zs["image"]["chance"]["top1"] == pytest.approx(1 / 3)
  emb = ev.embed_records(params, "train")["image"]["image_emb"]
  want = naive_top1(ev, params, emb, ["cat", "puppy", "car"], "a photo of a {}.", folder_data[1])
  assert zs["image"]["top1"] == pytest.approx(want)


def test_named_sets_each_equal_that_set_evaluated_alone(run, folder_data, tfds_data, capsys):
  workdir, cfg, _, _ = run
  sets = f"eval.sets=('folder={folder_data[0]}:train', 'tfds={tfds_data[0]}:test')"
  ev, params, both = evaluate(cfg, workdir, sets)
  printed = capsys.readouterr().out
  assert list(both) == ["step", "sets"] and list(both["sets"]) == ["folder", "tfds"]
  assert f"eval: skipping zeroshot on 'folder': data '{folder_data[0]}' has no classes" in printed
  # The folder set alone is the default (unnamed) evaluation of the run's own config.
  _, _, alone = evaluate(cfg, workdir)
  folder = dict(both["sets"]["folder"])
  assert folder.pop("data_dir") == folder_data[0]
  assert folder == alone
  _, _, tfds_alone = evaluate(cfg, workdir, f"eval.sets=('tfds={tfds_data[0]}:test',)")
  assert both["sets"]["tfds"] == tfds_alone["sets"]["tfds"]
  # The TFDS set: classes are its ClassLabel names, labels its examples' labels.
  tfds_result = both["sets"]["tfds"]
  assert tfds_result["num_images"] == 12 and "pooled_qb_norm" in tfds_result["retrieval"]
  tfds_set = next(s for s in ev.sets if s.name == "tfds")
  assert tfds_set.classes.names == CLASSES
  emb = ev.embed_records(params, "test", data_dir=tfds_data[0])["image"]["image_emb"]
  want = naive_top1(ev, params, emb, CLASSES, "a photo of a {}.", tfds_data[1])
  assert tfds_result["zeroshot"]["image"]["top1"] == pytest.approx(want)


def test_training_reports_each_set_under_its_name(run, folder_data, tfds_data, capsys):
  """Resuming the run one step further with three sets: per-set metrics, table and plots."""
  from jaxret import cli
  from jaxret.train.loop import train
  workdir, cfg, _, _ = run
  cfg = cfg.copy_and_resolve_references()
  cfg.total_steps = 4
  cfg.eval.sets = (f"folder={folder_data[0]}:train", "f2=:train", f"tfds={tfds_data[0]}:test")
  result = train(cfg, workdir, progress=False)
  printed = capsys.readouterr().out
  for name in ("folder", "f2", "tfds"):
    assert f"evaluation of set '{name}'" in printed
  assert result["sets"]["f2"]["i2t"] == result["sets"]["folder"]["i2t"]  # the same data
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  last = rows[-1]
  assert last["step"] == 4 and "eval/i2t_R@1" not in last
  assert last["eval/tfds/i2t_R@1"] == result["sets"]["tfds"]["i2t"]["R@1"]
  tfds_result = result["sets"]["tfds"]
  assert last["eval/tfds/pooled_db_norm/rsum"] == tfds_result["retrieval"]["pooled_db_norm"]["rsum"]
  assert last["eval/tfds/zeroshot_image/top1"] == tfds_result["zeroshot"]["image"]["top1"]
  with open(os.path.join(workdir, "eval.json")) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  # `jaxret eval` of the saved config evaluates the same sets to the same numbers, and plots
  cli.run(["eval", "--workdir", workdir])
  out = capsys.readouterr().out
  with open(os.path.join(workdir, "eval.json")) as f:
    again = json.load(f)
  assert list(again["sets"]) == ["folder", "f2", "tfds"]
  for name in again["sets"]:
    assert again["sets"][name]["i2t"] == pytest.approx(result["sets"][name]["i2t"])
    assert f"evaluation of set '{name}'" in out
  for name in ("recall_at_k_folder.png", "recall_at_k_f2.png", "recall_at_k_tfds.png",
               "training.png"):
    assert name in out
    with open(os.path.join(workdir, "plots", name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  from jaxret.eval.plots import _set_names
  assert _set_names(rows) == ["folder", "f2", "tfds"]


# --- everything checked before step 1 ---------------------------------------------------------


def test_a_bad_eval_split_fails_before_the_first_step(folder_data, tmp_path, capsys):
  from jaxret import cli
  workdir = tmp_path / "w"
  args = ["train", "--config", os.path.join(ROOT, "configs", "demo.py") + ":softmax",
          "--workdir", str(workdir), "--no-progress"]
  args += [f"--config.{o}" for o in TINY + [f"data.dir={folder_data[0]}", "data.eval_split=tset"]]
  with pytest.raises(SystemExit) as e:
    cli.main(args)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert f"data.eval_split 'tset' is not a split of '{folder_data[0]}'" in err
  assert "splits present: train" in err
  assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()


@pytest.mark.parametrize("overrides, message", [
    (["eval.sets=('x={data}:val',)"], "eval.sets entry 'x' split 'val' is not a split of"),
    (["eval.sets=('x={data}/nope:test',)"], "has no manifest.json"),
    (["eval.sets=('pooled=:train',)"], "eval.sets name 'pooled' is a retrieval scoring"),
    (["data.train_split=trian", "data.eval_split=train"],
     r"data.train_split \(the hubness bank's\) 'trian' is not a split .*did you mean 'train'"),
    (["eval.zeroshot_classes={tmp}/missing.txt"], "eval.zeroshot_classes file .* cannot be read"),
    (["eval.zeroshot_classes={tmp}/two.txt"],
     "first record of .* has label 'cat', which is not a class of class file"),
])
def test_eval_checks_name_the_key_to_fix(tiny_config, folder_data, tmp_path, overrides, message):
  from jaxret.eval.suite import build_evaluator
  from jaxret.experiment import Experiment
  (tmp_path / "two.txt").write_text("dog\ncar\n")
  data = folder_data[0]
  base = [f"data.dir={data}", "data.eval_split=train"]
  cfg = tiny_config("softmax", *base, *[o.format(data=data, tmp=tmp_path) for o in overrides])
  exp = Experiment(cfg)
  with pytest.raises(UserError, match=message) as e:
    build_evaluator(exp)
  assert "\n" not in str(e.value)


def test_eval_sets_syntax():
  assert config.parse_eval_sets(("coco5k=/data/coco:test", "f30k=gs://b/f30k", "val=:val",
                                 "g=gs://b/x:test")) == [
      ("coco5k", "/data/coco", "test"), ("f30k", "gs://b/f30k", ""), ("val", "", "val"),
      ("g", "gs://b/x", "test")]
  for bad, message in (("/data/coco:test", "write 'NAME=DIR:SPLIT'"),
                       ("a b=/x:test", "write 'NAME=DIR:SPLIT'"), ("a=", "write")):
    with pytest.raises(UserError, match=message):
      config.parse_eval_sets((bad,))
  with pytest.raises(UserError, match="names 'a' twice"):
    config.parse_eval_sets(("a=/x:test", "a=/y:test"))
  with pytest.raises(UserError, match="eval.zeroshot_templates entry 'a photo' has no '{}'"):
    config.load(os.path.join(ROOT, "configs", "demo.py"), ["eval.zeroshot_templates=('a photo',)"])
  with pytest.raises(UserError, match="write 'NAME=DIR:SPLIT'"):
    config.load(os.path.join(ROOT, "configs", "demo.py"), ["eval.sets=('coco',)"])


def test_record_labels(tmp_path):
  (tmp_path / "c.txt").write_text("n01\ttench\n# a comment\nn02\tgoldfish\n")
  c = classes.find_classes("d", {"source": {"images": "/x"}}, "s", str(tmp_path / "c.txt"))
  assert (c.names, c.keys) == (("tench", "goldfish"), ("n01", "n02"))
  assert c.label({"label": 1}, "r") == 1
  assert c.label({"label": "n02"}, "r") == 1
  assert c.label({"source": "train/n01/x.jpg"}, "r") == 0
  for meta, message in (({"label": 2}, "outside the 2 classes"), ({"label": "n03"}, "not a class"),
                        ({"source": "x.jpg"}, "has no label"), ({"label": 1.5}, "class index")):
    with pytest.raises(UserError, match=message):
      c.label(meta, "record 3")
  no_folders = classes.find_classes("d", {"splits": {"s": {"source": {"tars": ["a.tar"]}}},
                                          "source": {"images": "/x"}}, "s", str(tmp_path / "c.txt"))
  with pytest.raises(UserError, match="has no label"):
    no_folders.label({"source": "a.tar:dir/key"}, "r")
  demo = classes.find_classes("d", {"source": "digits", "classes": ["bag", "cup"],
                                    "cells": ["top left"]}, "test")
  assert demo.items and demo.label({"items": [["cup", "red", "top left"]]}, "r") == [1]
  assert classes.find_classes("d", {"splits": {"s": {"source": {"images": "/x"}}}}, "s") is None

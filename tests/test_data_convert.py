"""`jaxret data convert`: folder + JSONL/CSV and webdataset tars -> shards + manifest,
parallel, resumable without duplicates; the result trains through the pipeline."""

import csv
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import msgpack
import numpy as np
import pytest
from PIL import Image

from jaxret.data import convert, pipeline, sources

SIZE = 24


def image_bytes(i, fmt="JPEG", mode="RGB", size=(40, 30)):
  rng = np.random.default_rng(i)
  im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
  buf = io.BytesIO()
  im.convert(mode).save(buf, fmt)
  return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  d = tmp_path_factory.mktemp("folder")
  (d / "img").mkdir()
  rows = []
  for i in range(30):
    fmt, mode = [("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("JPEG", "CMYK")][i % 4]
    (d / "img" / f"{i}.{fmt.lower()}").write_bytes(image_bytes(i, fmt, mode))
    for c in range(1 + i % 3):  # COCO style: one row per caption
      rows.append({"image": f"{i}.{fmt.lower()}", "caption": f"picture {i} take {c}"})
  (d / "img" / "broken.jpeg").write_bytes(b"\xff\xd8 not really")
  rows.append({"image": "broken.jpeg", "caption": "a broken one"})
  rows.append({"image": "missing.jpeg", "caption": "not there"})
  (d / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  with open(d / "caps.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["file_name", "caption"])
    w.writeheader()
    w.writerows({"file_name": r["image"], "caption": r["caption"]} for r in rows)
  return d


def digest(d):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(d.glob("*.array_record"))}


def test_folder_jsonl_and_csv(folder, tmp_path):
  a = convert.convert(tmp_path / "a", images=folder / "img", captions=folder / "caps.jsonl",
                      shard_size=8, image_size=SIZE, vocab_size=700, workers=2, progress=False)
  s = a["splits"]["train"]
  assert s["num_records"] == 30 and s["skipped"] == 2 and len(s["files"]) == 4
  records = [msgpack.unpackb(r) for r in sources.open_split(tmp_path / "a", "train")]
  assert [len(r["captions"]) for r in records] == [1 + i % 3 for i in range(30)]
  assert records[5]["captions"][1] == "picture 5 take 1"
  b = convert.convert(tmp_path / "b", images=folder / "img", captions=folder / "caps.csv",
                      shard_size=8, image_size=SIZE, tokenizer=tmp_path / "a" / "tokenizer.json",
                      workers=1, progress=False)
  assert digest(tmp_path / "a") == digest(tmp_path / "b")  # parallel == serial, CSV == JSONL
  assert b["splits"]["train"]["sha256"] == s["sha256"]
  it = pipeline.train_iterator(tmp_path / "b", batch_size=6, text_len=12, seed=0,
                               process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (6, SIZE, SIZE, 3) and it.skipped == 0


def test_resume_after_interruption_gives_identical_output(folder, tmp_path):
  kw = dict(images=folder / "img", captions=folder / "caps.jsonl", shard_size=8,
            image_size=SIZE, vocab_size=700, workers=1, progress=False)
  full = convert.convert(tmp_path / "full", **kw)
  # An interrupted run: 2 of 4 shards finished, one half-written, no manifest yet.
  part = tmp_path / "part"
  jobs = convert.plan(part, "train", images=kw["images"], captions=kw["captions"],
                      shard_size=8, image_size=SIZE)
  part.mkdir()
  for job in jobs[:2]:
    convert._write_shard(job)
  (part / (jobs[2][1] + ".tmp")).write_bytes(b"half")
  (part / "tokenizer.json").write_bytes((tmp_path / "full" / "tokenizer.json").read_bytes())
  again = convert.convert(part, **kw)
  assert digest(part) == digest(tmp_path / "full")
  assert again["splits"] == full["splits"]
  assert not list(part.glob("*.done"))


def test_webdataset_tars_via_cli(tmp_path):
  tars = []
  for t in range(2):
    path = tmp_path / f"shard-{t}.tar"
    with tarfile.open(path, "w") as tar:
      for i in range(6):
        key = f"{t:02d}{i:04d}"
        files = {f"{key}.jpg": image_bytes(10 * t + i)}
        if i == 3:
          files[f"{key}.json"] = json.dumps({"caption": f"json caption {key}"}).encode()
        elif i == 4:
          files[f"{key}.txt"] = b"   "  # empty caption: skipped
        else:
          files[f"{key}.txt"] = f"text caption {key}".encode()
        for name, data in files.items():
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    tars.append(str(path))
  out = tmp_path / "wds"
  r = subprocess.run([sys.executable, "-m", "jaxret.cli", "data", "convert", "--tars", *tars,
                      "--out", str(out), "--image-size", str(SIZE), "--vocab-size", "700",
                      "--workers", "2"], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  m = json.loads((out / "manifest.json").read_text())
  assert m["splits"]["train"]["num_records"] == 10 and m["splits"]["train"]["skipped"] == 2
  caps = [msgpack.unpackb(x)["captions"] for x in sources.open_split(out, "train")]
  assert caps[3] == ["json caption 000003"] and caps[0] == ["text caption 000000"]


def test_tfds_dataset_read_without_tensorflow(tmp_path):
  """A tiny TFDS dataset prepared here in ArrayRecord form (images passed as PNG bytes)."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "label": tfds.features.ClassLabel(num_classes=3),
          "photo": tfds.features.Image(shape=(None, None, 3)),
          "texts": tfds.features.Sequence(tfds.features.Text()),
          "nested": tfds.features.Sequence({"text": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(9)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"label": i % 3, "photo": image_bytes(i, "PNG"),
                  "texts": [f"tfds {i}", f"again {i}"] if i != 4 else [],
                  "nested": {"text": [f"nested {i}"]}}

  builder = TinyCaptions(data_dir=str(tmp_path / "tfds"), file_format="array_record")
  builder.download_and_prepare()
  out = tmp_path / "out"
  m = convert.convert(out, tfds=builder.data_dir, shard_size=4, image_size=SIZE,
                      vocab_size=700, workers=1, progress=False)
  s = m["splits"]["train"]
  assert (s["num_records"], s["skipped"], len(s["files"])) == (8, 1, 3)
  caps = sorted(c for x in sources.open_split(out, "train") for c in msgpack.unpackb(x)["captions"])
  assert caps == sorted([f"tfds {i}" for i in range(9) if i != 4] +
                        [f"again {i}" for i in range(9) if i != 4])
  by_name = convert.convert(tmp_path / "out2", tfds="tiny_captions",
                            tfds_data_dir=str(tmp_path / "tfds"), shard_size=4, image_size=SIZE,
                            tokenizer=out / "tokenizer.json", workers=1, progress=False)
  assert by_name["splits"]["train"]["num_records"] == 8

  def content(d):  # meta names the source (folder vs name), so compare images and captions
    return [(r["image"], r["captions"]) for r in map(msgpack.unpackb, sources.open_split(d, "train"))]
  assert content(tmp_path / "out2") == content(out)
  nested = convert.convert(tmp_path / "out3", tfds=builder.data_dir, caption_key="nested/text",
                           shard_size=4, image_size=SIZE, tokenizer=out / "tokenizer.json",
                           workers=1, progress=False)
  assert nested["splits"]["train"]["num_records"] == 9

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

from jaxret import cli
from jaxret.data import convert, pipeline, sources, tokenizer_training, tokenizers
from jaxret.errors import UserError

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
                      shard_size=8, image_size=SIZE)["train"]
  for job in jobs[:2]:
    convert._write_shard(job)
  (part / "train.partial" / (jobs[2][1] + ".tmp")).write_bytes(b"half")
  kept = {j[1]: (part / "train.partial" / j[1]).stat().st_mtime_ns for j in jobs[:2]}
  (part / "tokenizer.json").write_bytes((tmp_path / "full" / "tokenizer.json").read_bytes())
  again = convert.convert(part, **kw)
  assert digest(part) == digest(tmp_path / "full")
  assert again["splits"] == full["splits"]
  assert {n: (part / n).stat().st_mtime_ns for n in kept} == kept  # finished shards not redone
  assert sorted(p.name for p in part.iterdir()) == sorted(
      ["manifest.json", "tokenizer.json", *again["splits"]["train"]["files"]])


def caption_file(path, folder, ids, text="picture {i}"):
  """A JSONL of the fixture's images `ids` -> [[captions]] it gives, in order."""
  ext = ["jpeg", "png", "png", "jpeg"]
  rows = [{"image": f"{i}.{ext[i % 4]}", "caption": text.format(i=i)} for i in ids]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return [[r["caption"]] for r in rows]


def records(d, split):
  return [msgpack.unpackb(r) for r in sources.open_split(d, split)]


def snapshot(d):
  return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def two_splits(folder, tmp_path):
  """A data dir with train (images 0-19) and test (20-29, three shards) -> (dir, kw)."""
  d = tmp_path / "d"
  kw = dict(images=folder / "img", image_size=SIZE, workers=1, progress=False)
  caption_file(tmp_path / "train.jsonl", folder, range(20))
  convert.convert(d, captions=tmp_path / "train.jsonl", shard_size=8, vocab_size=700, **kw)
  caption_file(tmp_path / "test.jsonl", folder, range(20, 30), "test {i}")
  convert.convert(d, split="test", captions=tmp_path / "test.jsonl", shard_size=4, **kw)
  return d, kw


def test_a_later_split_is_added_beside_the_others(folder, tmp_path):
  d = tmp_path / "d"
  train = caption_file(tmp_path / "train.jsonl", folder, range(20))
  convert.convert(d, captions=tmp_path / "train.jsonl", images=folder / "img", shard_size=8,
                  image_size=SIZE, vocab_size=700, workers=1, progress=False)
  before, tok = digest(d), (d / "tokenizer.json").read_bytes()
  test = caption_file(tmp_path / "test.jsonl", folder, range(20, 30), "test {i}")
  cli.run(["data", "convert", "--captions", str(tmp_path / "test.jsonl"), "--images",
           str(folder / "img"), "--out", str(d), "--split", "test", "--image-size", str(SIZE),
           "--shard-size", "4", "--workers", "1"])
  m = sources.load_manifest(d)
  assert list(m["splits"]) == ["train", "test"] and m["image_size"] == SIZE
  assert {n: h for n, h in digest(d).items() if n.startswith("train-")} == before
  assert (d / "tokenizer.json").read_bytes() == tok  # reused, not retrained on test captions
  assert [r["captions"] for r in records(d, "train")] == train
  assert [r["captions"] for r in records(d, "test")] == test
  assert sorted(p.name for p in d.iterdir()) == sorted(
      ["manifest.json", "tokenizer.json", *m["splits"]["train"]["files"],
       *m["splits"]["test"]["files"]])


def test_replacing_a_split_changes_only_its_shards(two_splits, folder, tmp_path):
  d, kw = two_splits
  m = sources.load_manifest(d)
  train = {n: (d / n).read_bytes() for n in m["splits"]["train"]["files"]}
  new = caption_file(tmp_path / "new.jsonl", folder, range(22, 28), "new {i}")
  again = convert.convert(d, split="test", captions=tmp_path / "new.jsonl", shard_size=8, **kw)
  assert again["splits"]["train"] == m["splits"]["train"]
  assert list(again["splits"]) == ["train", "test"]
  assert {n: (d / n).read_bytes() for n in train} == train
  assert [r["captions"] for r in records(d, "test")] == new
  assert sorted(p.name for p in d.iterdir()) == sorted(  # the old three test shards are gone
      ["manifest.json", "tokenizer.json", *train, "test-00000-of-00001.array_record"])


def test_a_replacement_is_readable_until_done_and_failures_change_nothing(two_splits, folder,
                                                                          tmp_path):
  d, kw = two_splits
  old = records(d, "test")
  before = snapshot(d)
  (tmp_path / "bad.jsonl").write_text('{"image": "missing.jpeg", "caption": "gone"}\n')
  with pytest.raises(UserError, match="no usable records for split 'test'.*unchanged"):
    convert.convert(d, split="test", captions=tmp_path / "bad.jsonl", **kw)
  assert snapshot(d) == before and not (d / "test.partial").exists()
  # Interrupted while replacing test by shards of the same names: one new shard is staged,
  # the data dir still lists and serves the old test split.
  new = caption_file(tmp_path / "new.jsonl", folder, range(20, 30), "new {i}")
  jobs = convert.plan(d, "test", images=kw["images"], captions=tmp_path / "new.jsonl",
                      shard_size=4, image_size=SIZE)["test"]
  assert [j[1] for j in jobs] == sources.load_manifest(d)["splits"]["test"]["files"]
  convert._write_shard(jobs[0])
  assert records(d, "test") == old and snapshot(d) == before
  convert.convert(d, split="test", captions=tmp_path / "new.jsonl", shard_size=4, **kw)
  assert [r["captions"] for r in records(d, "test")] == new
  assert not (d / "test.partial").exists() and not (d / "manifest.json.tmp").exists()


def test_later_splits_keep_the_first_tokenizer_and_size(two_splits, folder, tmp_path):
  d, kw = two_splits
  before = snapshot(d)
  tokenizer_training.train_bpe(["a different corpus entirely"] * 3, tmp_path / "tokenizer.json",
                       vocab_size=600)
  args = ["data", "convert", "--captions", str(tmp_path / "val.jsonl"), "--images",
          str(folder / "img"), "--out", str(d), "--split", "val", "--workers", "1"]
  caption_file(tmp_path / "val.jsonl", folder, range(5))
  with pytest.raises(UserError, match=r"ships 'tokenizer.json' with its splits train, test, and "
                     r"--tokenizer '.*' differs: leave --tokenizer out"):
    cli.run(args + ["--image-size", str(SIZE), "--tokenizer", str(tmp_path / "tokenizer.json")])
  with pytest.raises(UserError, match=f"stores {SIZE} px images .*--image-size {SIZE}"):
    cli.run(args + ["--image-size", str(2 * SIZE)])
  assert snapshot(d) == before
  # The same tokenizer, from anywhere, is welcome.
  (tmp_path / "copy").mkdir()
  (tmp_path / "copy" / "tokenizer.json").write_bytes(before["tokenizer.json"])
  cli.run(args + ["--image-size", str(SIZE), "--tokenizer",
                  str(tmp_path / "copy" / "tokenizer.json")])
  assert list(sources.load_manifest(d)["splits"]) == ["train", "test", "val"]
  assert (d / "tokenizer.json").read_bytes() == before["tokenizer.json"]


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


def test_clip_vocab_file_ships_with_its_merges(folder, tmp_path):
  """--tokenizer .../vocab.json: CLIP's pair is copied together and loads as the original."""
  clip = tmp_path / "clip"
  clip.mkdir()
  tok = tokenizer_training.train_bpe([f"picture {i} of things" for i in range(50)], clip / "t.json",
                             vocab_size=600, specials=(tokenizers.CLIP_BOS, tokenizers.CLIP_EOS))
  tokenizers.save_clip_files(tok, clip)
  caption_file(tmp_path / "caps.jsonl", folder, range(4))
  m = convert.convert(tmp_path / "d", captions=tmp_path / "caps.jsonl", images=folder / "img",
                      image_size=SIZE, tokenizer=clip / "vocab.json", workers=1, progress=False)
  shipped = tokenizers.load_tokenizer(tmp_path / "d" / m["tokenizer"], 16)
  original = tokenizers.load_tokenizer(clip / "vocab.json", 16)
  texts = ["picture 3 of things", "unseen words here"]
  np.testing.assert_array_equal(shipped.encode_batch(texts), original.encode_batch(texts))

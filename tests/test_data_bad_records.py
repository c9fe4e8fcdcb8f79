"""Broken records never stop training: modes converted, bad records skipped and counted,
with the same batches for any number of processes and exact resume; bad shards fail at start."""

import io
import json
import os
import shutil

import msgpack
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image

from jaxret.data import pipeline, transforms
from jaxret.errors import UserError


def encode(im, fmt="PNG"):
  buf = io.BytesIO()
  im.save(buf, fmt)
  return buf.getvalue()


def test_image_modes_become_rgb():
  gray = Image.new("L", (4, 4), 100)
  cases = {
      "L": (gray, "PNG", (100, 100, 100)),
      "LA": (Image.new("LA", (4, 4), (50, 0)), "PNG", (255, 255, 255)),  # transparent -> white
      "RGBA": (Image.new("RGBA", (4, 4), (255, 0, 0, 255)), "PNG", (255, 0, 0)),
      "RGBA-clear": (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG", (255, 255, 255)),
      "P": (Image.new("RGB", (4, 4), (0, 0, 255)).convert("P"), "PNG", (0, 0, 255)),
      "CMYK": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
      "I;16": (Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG", (255, 255, 255)),
      "1": (Image.new("1", (4, 4), 1), "PNG", (255, 255, 255)),
  }
  for name, (im, fmt, want) in cases.items():
    out = transforms.decode_image(encode(im, fmt))
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3), name
    np.testing.assert_allclose(out[0, 0], want, atol=2, err_msg=name)


def test_bad_images_and_captions_raise_bad_record():
  good = encode(Image.new("RGB", (8, 8), (10, 20, 30)))
  bad = [good[:len(good) // 2], b"not an image", b""]
  for data in bad:
    with pytest.raises(transforms.BadRecord):
      transforms.decode_image(data)
  assert transforms.clean_captions(["", "  ", 3, None, b"caf\xc3\xa9 ", " ok "]) == ["café", "ok"]
  assert transforms.clean_captions("one") == ["one"] and transforms.clean_captions(7) == []


# ---------------------------------------------------------------- a data dir with broken records

SIZE = 16


def good_record(i):
  rng = np.random.default_rng(i)
  pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  pixels[0, 0] = (i % 256, i // 256, 7)  # The record's index, readable after decoding.
  return {"image": encode(Image.fromarray(pixels)), "captions": [f"record {i}", f"item {i}"]}


def broken(i, kind):
  r = good_record(i)
  if kind == "truncated":
    r["image"] = r["image"][:len(r["image"]) // 3]
  elif kind == "garbage":
    return b"\xc1 not msgpack"
  elif kind == "empty-caption":
    r["captions"] = ["", "   "]
  elif kind == "non-text-caption":
    r["captions"] = [42, None]
  elif kind == "no-image":
    r["image"] = None
  return msgpack.packb(r)


KINDS = ("truncated", "garbage", "empty-caption", "non-text-caption", "no-image")


def write_dir(out, records, *, tokenizer_from, num_shards=2):
  out.mkdir(parents=True, exist_ok=True)
  names = [f"train-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)]
  writers = [ArrayRecordWriter(str(out / n), "group_size:1") for n in names]
  for i, rec in enumerate(records):
    writers[i * num_shards // len(records)].write(rec)
  for w in writers:
    w.close()
  shutil.copy(tokenizer_from, out / "tokenizer.json")
  manifest = {"format": "jaxret-records-v1", "name": "bad", "image_size": SIZE,
              "tokenizer": "tokenizer.json",
              "splits": {"train": {"files": names, "num_records": len(records), "sha256": {}}}}
  (out / "manifest.json").write_text(json.dumps(manifest))
  return out


N = 400
BAD = {17: "truncated", 101: "garbage", 202: "empty-caption", 303: "non-text-caption",
       399: "no-image"}  # 5 of 400 (1.25%)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory, demo_dir):
  records = [broken(i, BAD[i]) if i in BAD else msgpack.packb(good_record(i)) for i in range(N)]
  return write_dir(tmp_path_factory.mktemp("bad"), records,
                   tokenizer_from=os.path.join(demo_dir, "tokenizer.json"))


def record_ids(batch):
  px = batch["image"][:, 0, 0].astype(int)
  return (px[:, 0] + 256 * px[:, 1]).tolist()


def test_one_epoch_counts_each_bad_record_once(bad_dir):
  it = pipeline.train_iterator(bad_dir, batch_size=8, text_len=8, seed=3, process_index=0,
                               process_count=1)
  seen = [i for _ in range(N // 8) for i in record_ids(next(it))]
  assert it.skipped == len(BAD)
  assert not set(seen) & set(BAD)
  assert len(set(seen)) == N - len(BAD)  # every good record, substitutes repeating a few


def test_bad_records_keep_global_batches_and_resume(bad_dir):
  def make(p, count):
    return pipeline.train_iterator(bad_dir, batch_size=8 // count, text_len=8, seed=3,
                                   process_index=p, process_count=count)
  one = make(0, 1)
  two = [make(0, 2), make(1, 2)]
  for _ in range(30):
    want = next(one)
    parts = [next(it) for it in two]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in parts]), want["image"])
    np.testing.assert_array_equal(np.concatenate([b["text"] for b in parts]), want["text"])
  assert two[0].skipped + two[1].skipped == one.skipped > 0
  state = json.loads(json.dumps(one.get_state()))
  later = [next(one) for _ in range(25)]  # crosses the epoch boundary (50 batches)
  resumed = make(0, 1)
  resumed.set_state(state)
  for want in later:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["text"], want["text"])
  assert resumed.skipped == one.skipped


def test_missing_or_damaged_shard_fails_at_start_with_its_path(bad_dir, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(bad_dir, copy)
  shard = copy / "train-00001-of-00002.array_record"
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  with pytest.raises(UserError, match="train-00001-of-00002.array_record"):
    pipeline.train_iterator(copy, batch_size=8, text_len=8, seed=0, process_index=0,
                            process_count=1)
  shard.unlink()
  with pytest.raises(UserError, match="train-00001-of-00002.array_record.*missing"):
    pipeline.train_iterator(copy, batch_size=8, text_len=8, seed=0, process_index=0,
                            process_count=1)


def test_training_with_one_percent_bad_records_counts_them_and_resumes(demo_dir, tiny_config,
                                                                       tmp_path):
  """512 records, 5 broken (~1%), one epoch in 16 steps of 32, stopped at 9 and resumed."""
  from jaxret.train.loop import train
  data = tmp_path / "data"
  shutil.copytree(demo_dir, data)
  manifest = json.loads((data / "manifest.json").read_text())
  records = []
  for name in manifest["splits"]["train"]["files"]:
    reader = ArrayRecordReader(str(data / name))
    records.append(reader.read_all())
    reader.close()
  bad = {0: "truncated", 3: "garbage", 1: "empty-caption", 2: "non-text-caption", 4: "no-image"}
  for k, kind in bad.items():  # one broken record in each of the first shards
    shard = k % len(records)
    rec = msgpack.unpackb(records[shard][7 * k])
    rec["image"] = rec["image"][:40] if kind == "truncated" else rec["image"]
    rec = {"truncated": rec, "garbage": None, "empty-caption": {**rec, "captions": [""]},
           "non-text-caption": {**rec, "captions": [1.5]}, "no-image": {**rec, "image": None}}[kind]
    records[shard][7 * k] = b"\x00\xff junk" if rec is None else msgpack.packb(rec)
  for name, recs in zip(manifest["splits"]["train"]["files"], records):
    w = ArrayRecordWriter(str(data / name), "group_size:1")
    for r in recs:
      w.write(r)
    w.close()
  assert sum(map(len, records)) == 512
  cfg = tiny_config("softmax", f"data.dir={data}", "batch_size=32", "total_steps=16",
                    "checkpoint.every=4", "log_every=4", "eval_every=0")
  work = str(tmp_path / "run")
  assert train(cfg, work, stop_after_step=9, progress=False) is None
  train(cfg, work, progress=False)
  rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
  skipped = {r["step"]: r["data/skipped"] for r in rows if "data/skipped" in r}
  assert sorted(skipped) == [4, 8, 12, 16]
  assert skipped[16] == len(bad)
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)

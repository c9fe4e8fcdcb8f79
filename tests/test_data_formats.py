"""Caption files in the layouts people download (COCO captions, Karpathy splits, Flickr30k
results.csv), webdataset tars read as streams, and JPEG draft decoding: each built here in its
real layout, converted through the CLI and checked against what the test wrote."""

import io
import json
import tarfile

import msgpack
import numpy as np
import pytest
from PIL import Image

from jaxret import cli
from jaxret.data import convert, sources
from jaxret.errors import UserError

SIZE = 24
# (size, mode, format): mixed sizes (portrait, landscape, square, smaller than SIZE, and large
# enough for JPEG draft decoding) and modes (palette, alpha, grey).
SPECS = [((64, 48), "RGB", "JPEG"), ((40, 72), "L", "JPEG"), ((50, 50), "RGBA", "PNG"),
         ((36, 60), "P", "PNG"), ((20, 16), "RGB", "PNG"), ((120, 90), "RGB", "JPEG"),
         ((70, 44), "L", "PNG"), ((48, 64), "RGBA", "PNG")]


def picture(i, size, mode):
  """A smooth picture with its own colour (JPEG keeps it close), in `mode`."""
  w, h = size
  yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
  base = np.array([(37 * i) % 200, (91 * i) % 200, (53 * i) % 200], np.float32) + 30
  rgb = base + 40 * np.stack([xx, yy, xx * yy], -1)
  im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
  if mode == "RGBA":
    alpha = (255 * (0.4 + 0.6 * xx)).astype(np.uint8)
    return Image.merge("RGBA", (*im.split(), Image.fromarray(alpha)))
  if mode == "P":
    return im.quantize(64)
  return im.convert(mode)


def write_picture(path, i):
  size, mode, fmt = SPECS[i % len(SPECS)]
  path.parent.mkdir(parents=True, exist_ok=True)
  picture(i, size, mode).save(path, fmt)


def expected(path):
  """What the stored image should look like: alpha over white, shorter side SIZE (a separate
  route from convert's: everything through RGBA)."""
  with Image.open(path) as im:
    rgba = im.convert("RGBA")
  rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
  w, h = rgb.size
  s = SIZE / min(w, h)
  return np.asarray(rgb.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))),
                               Image.BICUBIC), np.float32)


def records(data_dir, split):
  return [msgpack.unpackb(r) for r in sources.open_split(data_dir, split)]


def check_images(recs, images_dir):
  for r in recs:
    got = np.asarray(Image.open(io.BytesIO(r["image"])), np.float32)
    want = expected(images_dir / r["meta"]["source"])
    assert got.shape == want.shape, r["meta"]
    assert np.abs(got - want).mean() < 4, r["meta"]


def run(*args):
  cli.run(["data", "convert", "--image-size", str(SIZE), "--vocab-size", "700", "--workers", "1",
           *map(str, args)])


# ---------------------------------------------------------------------------- COCO captions


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
  d = tmp_path_factory.mktemp("coco")
  images, annotations = [], []
  for i in range(7):
    file_name = f"{391895 + i:012d}.jpg" if SPECS[i][2] == "JPEG" else f"{391895 + i:012d}.png"
    write_picture(d / "train2017" / file_name, i)
    w, h = SPECS[i][0]
    images.append({"license": 3, "file_name": file_name,
                   "coco_url": f"http://images.cocodataset.org/train2017/{file_name}",
                   "height": h, "width": w, "date_captured": "2013-11-14 11:18:45",
                   "flickr_url": "http://farm4.staticflickr.com/x.jpg", "id": 391895 + i})
  ann_id = 37
  for k in range(3):  # Annotations interleave images, as COCO's do; image 6 has none.
    for i in range(6):
      if k < 1 + i % 3:
        annotations.append({"image_id": 391895 + i, "id": ann_id,
                            "caption": f"A photo {i} seen the {k} way. "})
        ann_id += 1
  doc = {"info": {"description": "COCO 2017 Dataset", "url": "http://cocodataset.org",
                  "version": "1.0", "year": 2017, "contributor": "COCO Consortium",
                  "date_created": "2017/09/01"},
         "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                       "name": "Attribution-NonCommercial-ShareAlike License"}],
         "images": images, "annotations": annotations}
  (d / "annotations").mkdir()
  (d / "annotations" / "captions_train2017.json").write_text(json.dumps(doc))  # one line
  return d, doc


def test_coco_captions_file(coco, tmp_path):
  d, doc = coco
  out = tmp_path / "out"
  run("--captions", d / "annotations" / "captions_train2017.json", "--images", d / "train2017",
      "--out", out)
  m = sources.load_manifest(out)
  assert list(m["splits"]) == ["train"]
  assert m["splits"]["train"]["skipped"] == 1  # the image without captions
  recs = records(out, "train")
  want = {}
  for a in doc["annotations"]:
    want.setdefault(a["image_id"], []).append(a["caption"].strip())
  assert [r["meta"]["image_id"] for r in recs] == [im["id"] for im in doc["images"][:6]]
  assert [r["captions"] for r in recs] == [want[r["meta"]["image_id"]] for r in recs]
  assert sorted({len(c) for c in want.values()}) == [1, 2, 3]
  check_images(recs, d / "train2017")


# ---------------------------------------------------------------------------- Karpathy splits


def karpathy_image(i, split, filepath=None, cocoid=None):
  sentences = [{"tokens": ["a", "picture", str(i), "number", str(s)],
                "raw": f"A picture {i}, number {s}.", "imgid": i, "sentid": 5 * i + s}
               for s in range(5)]
  im = {"sentids": [5 * i + s for s in range(5)], "imgid": i, "sentences": sentences,
        "split": split}
  if filepath:
    im.update(filepath=filepath, filename=f"COCO_{filepath}_{cocoid:012d}.jpg", cocoid=cocoid)
  else:
    im["filename"] = f"{1000092795 + i}.jpg"
  return im


KARPATHY_SPLITS = ["train", "restval", "val", "test", "train", "restval", "test", "train",
                   "val", "restval"]


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
  d = tmp_path_factory.mktemp("karpathy")
  coco_images = []
  for i, split in enumerate(KARPATHY_SPLITS):
    filepath = "train2014" if split in ("train", "restval") else "val2014"
    im = karpathy_image(i, split, filepath, cocoid=391895 + i)
    coco_images.append(im)
    # COCO's file names say .jpg; two of ours are PNGs inside (PIL goes by the bytes).
    size, mode, _ = SPECS[i % len(SPECS)]
    (d / "coco" / filepath).mkdir(parents=True, exist_ok=True)
    picture(i, size, mode).save(d / "coco" / filepath / im["filename"],
                                "PNG" if mode in ("RGBA", "P") else "JPEG")
  (d / "dataset_coco.json").write_text(json.dumps({"images": coco_images, "dataset": "coco"}))
  flickr_images = [karpathy_image(i, s) for i, s in enumerate(["train", "val", "test", "test",
                                                               "train", "train"])]
  for im in flickr_images:
    write_picture(d / "flickr30k-images" / im["filename"], im["imgid"])
  # Pretty-printed, unlike the real one-line files: both must be recognised.
  (d / "dataset_flickr30k.json").write_text(
      json.dumps({"images": flickr_images, "dataset": "flickr30k"}, indent=2))
  return d, coco_images, flickr_images


def test_karpathy_coco_writes_every_split(karpathy, tmp_path):
  d, images, _ = karpathy
  out = tmp_path / "out"
  run("--karpathy", d / "dataset_coco.json", "--images", d / "coco", "--out", out)
  m = sources.load_manifest(out)
  assert list(m["splits"]) == ["train", "val", "test"]
  want = {"train": [i for i, s in enumerate(KARPATHY_SPLITS) if s in ("train", "restval")],
          "val": [i for i, s in enumerate(KARPATHY_SPLITS) if s == "val"],
          "test": [i for i, s in enumerate(KARPATHY_SPLITS) if s == "test"]}
  for split, ids in want.items():
    recs = records(out, split)
    assert [r["meta"]["image_id"] for r in recs] == [391895 + i for i in ids]
    assert [r["meta"]["source"] for r in recs] == [
        f"{images[i]['filepath']}/{images[i]['filename']}" for i in ids]
    assert [r["captions"] for r in recs] == [
        [f"A picture {i}, number {s}." for s in range(5)] for i in ids]
    check_images(recs, d / "coco")
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ["manifest.json", "tokenizer.json"] + [f for s in m["splits"].values() for f in s["files"]])


def test_karpathy_rerun_after_interruption_keeps_staged_splits(karpathy, tmp_path):
  """Cut short while staging val: train's finished shards are reused, nothing was listed."""
  d, _, _ = karpathy
  out = tmp_path / "out"
  kw = dict(karpathy=d / "dataset_coco.json", images=d / "coco", image_size=SIZE,
            shard_size=2, vocab_size=700, workers=1, progress=False)
  jobs = convert.plan(out, images=kw["images"], captions=kw["karpathy"],
                      caption_format="karpathy", shard_size=2, image_size=SIZE)
  for job in jobs["train"] + jobs["val"][:1]:
    convert._write_shard(job)
  staged = {j[1]: (out / "train.partial" / j[1]).stat().st_mtime_ns for j in jobs["train"]}
  assert not (out / "manifest.json").exists()
  m = convert.convert(out, **kw)
  assert {n: (out / n).stat().st_mtime_ns for n in staged} == staged
  whole = convert.convert(tmp_path / "whole", **kw)
  for split in ("train", "val", "test"):
    assert m["splits"][split]["sha256"] == whole["splits"][split]["sha256"]


def test_karpathy_flickr_detected_one_split(karpathy, tmp_path):
  d, _, images = karpathy
  out = tmp_path / "out"
  run("--captions", d / "dataset_flickr30k.json", "--images", d / "flickr30k-images",
      "--split", "test", "--out", out)
  m = sources.load_manifest(out)
  assert list(m["splits"]) == ["test"]
  recs = records(out, "test")
  assert [r["meta"]["source"] for r in recs] == [im["filename"] for im in images
                                                 if im["split"] == "test"]
  check_images(recs, d / "flickr30k-images")
  with pytest.raises(UserError, match=r"split 'restval' is not in .* \(it has train, val, test; "
                     r"restval is part of train\)"):
    run("--karpathy", d / "dataset_flickr30k.json", "--images", d / "flickr30k-images",
        "--split", "restval", "--out", out)


def test_karpathy_missing_images_named(karpathy, tmp_path, capsys):
  d, images, _ = karpathy
  # The user points --images at train2014/ itself: every path then misses its folder.
  with pytest.raises(SystemExit) as e:
    cli.main(["data", "convert", "--karpathy", str(d / "dataset_coco.json"),
              "--images", str(d / "coco" / "train2014"), "--out", str(tmp_path / "out")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  first = d / "coco" / "train2014" / images[0]["filepath"] / images[0]["filename"]
  assert err == (f"jaxret: error: 10 of 10 images named in '{d / 'dataset_coco.json'}' are not "
                 f"under '{d / 'coco' / 'train2014'}' (first: '{first}'): pass the folder "
                 "holding train2014/ and val2014/ as --images")
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- Flickr30k results.csv


@pytest.fixture(scope="module")
def flickr_csv(tmp_path_factory):
  d = tmp_path_factory.mktemp("flickr")
  lines = ["image_name| comment_number| comment"]
  want = {}
  for i in range(4):
    name = f"{1000092795 + i}.jpg"
    write_picture(d / "flickr30k_images" / name, i)
    for k in range(5):
      text = f"Two young guys {i} with shaggy hair , take {k} ."
      want.setdefault(name, []).append(text)
      if (i, k) == (2, 4):  # the Kaggle file's row without its second '|'
        lines.append(f"{name}| {k}   {text}")
      else:
        lines.append(f"{name}| {k}| {text}")
  (d / "results.csv").write_text("\n".join(lines) + "\n")
  return d, want


@pytest.mark.parametrize("fmt", [None, "flickr30k"])
def test_flickr30k_results_csv(flickr_csv, tmp_path, fmt):
  d, want = flickr_csv
  out = tmp_path / "out"
  run("--captions", d / "results.csv", "--images", d / "flickr30k_images", "--out", out,
      *(["--format", fmt] if fmt else []))
  recs = records(out, "train")
  assert {r["meta"]["source"]: r["captions"] for r in recs} == want
  assert all(len(r["captions"]) == 5 for r in recs)
  check_images(recs, d / "flickr30k_images")


# ---------------------------------------------------------------------------- bad caption files


@pytest.mark.parametrize("content", [
    '[{"image": "a.jpg", "caption": "x"}]',   # a JSON array
    "picture,words\na.jpg,hello\n",            # CSV without an image path column
    '{"images": [{"id": 1}], "categories": []}',
    "a.jpg\thello\n",                          # Flickr's older results_20130124.token
])
def test_unknown_layout_refused(tmp_path, capsys, content):
  (tmp_path / "img").mkdir()
  (tmp_path / "caps.txt").write_text(content)
  with pytest.raises(SystemExit) as e:
    cli.main(["data", "convert", "--captions", str(tmp_path / "caps.txt"),
              "--images", str(tmp_path / "img"), "--out", str(tmp_path / "out")])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "is in no layout jaxret reads" in err
  for layout in ("JSONL", "CSV", "COCO captions_*.json", "Karpathy dataset_*.json",
                 "Flickr30k results.csv", "--format"):
    assert layout in err


def test_wrong_explicit_format_and_coco_instances(karpathy, coco, tmp_path):
  d, _, _ = karpathy
  with pytest.raises(UserError, match="is not a coco caption file"):
    run("--captions", d / "dataset_coco.json", "--format", "coco", "--images", d / "coco",
        "--out", tmp_path / "out")
  c, doc = coco
  instances = dict(doc, annotations=[{"segmentation": [[1, 2]], "area": 2.0, "iscrowd": 0,
                                      "image_id": 391895, "bbox": [0, 0, 1, 1],
                                      "category_id": 18, "id": 1768}])
  (tmp_path / "instances_train2017.json").write_text(json.dumps(instances))
  with pytest.raises(UserError, match="annotations have no 'caption'"):
    run("--captions", tmp_path / "instances_train2017.json", "--images", c / "train2017",
        "--out", tmp_path / "out")
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- webdataset tars


def test_compressed_tar_read_as_a_stream(tmp_path):
  """A .tar.gz (no seeking); samples are runs of members sharing a key, so a key that comes
  back later is a new sample (webdataset's rule)."""
  members = []
  for i in range(5):
    buf = io.BytesIO()
    size, mode, fmt = SPECS[i]
    picture(i, size, mode).save(buf, fmt)
    ext = "jpg" if fmt == "JPEG" else "png"
    members += [(f"part/{i:04d}.{ext}", buf.getvalue()),
                (f"part/{i:04d}.txt", f"tar caption {i}".encode())]
  members.append(("part/0001.txt", b"a late caption, alone"))  # no image: skipped
  with tarfile.open(tmp_path / "shard.tar.gz", "w:gz") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  out = tmp_path / "out"
  run("--tars", tmp_path / "shard.tar.gz", "--out", out)
  assert sources.load_manifest(out)["splits"]["train"]["skipped"] == 1
  recs = records(out, "train")
  assert [r["captions"] for r in recs] == [[f"tar caption {i}"] for i in range(5)]
  assert [r["meta"]["source"] for r in recs] == [f"shard.tar.gz:part/{i:04d}" for i in range(5)]
  for i, r in enumerate(recs):
    buf = io.BytesIO()
    picture(i, SPECS[i][0], SPECS[i][1]).save(buf, SPECS[i][2])
    (tmp_path / "ref").write_bytes(buf.getvalue())
    got = np.asarray(Image.open(io.BytesIO(r["image"])), np.float32)
    assert np.abs(got - expected(tmp_path / "ref")).mean() < 4
  # A tar cut short: one line naming it, not a traceback.
  with tarfile.open(tmp_path / "shard.tar", "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  with tarfile.open(tmp_path / "shard.tar") as tar:
    cut = tar.getmembers()[4].offset_data + 100  # inside the third image
  (tmp_path / "cut.tar").write_bytes((tmp_path / "shard.tar").read_bytes()[:cut])
  with pytest.raises(UserError, match=r"tar shard '.*cut.tar' is damaged \(ReadError: "):
    run("--tars", tmp_path / "cut.tar", "--out", tmp_path / "cut")


# ---------------------------------------------------------------------------- JPEG draft mode


def test_draft_decoding_stays_close_to_full_decoding():
  """Large JPEGs are decoded at 1/2 scale (DCT domain) before the exact resize; the result
  must match the full decode's to within JPEG noise."""
  rng = np.random.default_rng(0)
  small = rng.random((12, 16, 3)) * 255  # smooth noise, upsampled: photo-like
  im = Image.fromarray(small.astype(np.uint8)).resize((640, 480), Image.BICUBIC)
  buf = io.BytesIO()
  im.save(buf, "JPEG", quality=90)
  data = buf.getvalue()
  fast = np.asarray(Image.open(io.BytesIO(convert.prepare_image(data, 224))), np.float32)
  full = np.asarray(Image.open(io.BytesIO(convert.prepare_image(data, 224, draft=False))),
                    np.float32)
  assert fast.shape == full.shape == (224, 299, 3)
  diff = np.abs(fast - full)
  assert 0 < diff.mean() < 1.5 and np.percentile(diff, 99) < 8
  # Below twice the size nothing is drafted: both routes are the same.
  buf = io.BytesIO()
  im.resize((400, 300)).save(buf, "JPEG", quality=90)
  assert (convert.prepare_image(buf.getvalue(), 224)
          == convert.prepare_image(buf.getvalue(), 224, draft=False))

"""`jaxret data convert`: image folders with caption files, or webdataset tar shards, to
ArrayRecord shards + manifest.json (sources.py's "jaxret-records-v1").

Inputs:
  folder  --images DIR --captions FILE.jsonl|FILE.csv: one row per image ({"image": path,
          "captions": [...]} or "caption": str) or one row per caption (COCO/Flickr style);
          rows naming the same image are merged, in first-seen order.
  tar     --tars A.tar B.tar ...: webdataset members grouped by key (the name up to the
          first dot): an image (.jpg/.jpeg/.png/.webp) and a caption (.txt, or .json with
          "caption"/"captions"/"text").
  tfds    --tfds NAME or a prepared dataset folder (--tfds-data-dir, --tfds-split): any TFDS
          dataset with an image and a text (or sequence of texts) feature, read with
          `tfds.data_source` (ArrayRecord files, no TensorFlow); --image-key/--caption-key
          pick the features (default: the first image and the first text feature).
Each image is made RGB, resized (shorter side) and center-cropped to --image-size, and stored
as JPEG (quality 95); images that cannot be decoded or have no caption are left out and
counted in the manifest ("skipped").

Shards are written in parallel (processes), each to a temporary name and then renamed with a
small ".done" note (records, sha256); a rerun after an interruption keeps finished shards and
writes only the rest, so records are never duplicated. The manifest is written last.
"""

import csv
import io
import json
import multiprocessing
import os
import tarfile
from pathlib import Path

import msgpack
from PIL import Image
from tqdm import tqdm

from jaxret.data import sources, tokenizers, transforms
from jaxret.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_KEYS = ("captions", "caption", "text", "sentences")
PATH_KEYS = ("image", "path", "file", "file_name", "filename", "image_path")


def _captions_of(row):
  for key in CAPTION_KEYS:
    if key in row and row[key] not in (None, ""):
      value = row[key]
      if isinstance(value, str) and value.startswith("["):
        try:
          value = json.loads(value)
        except ValueError:
          pass
      return transforms.clean_captions(value)
  return []


def read_caption_file(path):
  """JSONL or CSV of image path + caption(s) -> [(path, [captions])], merged by path."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"caption file '{path}' not found")
  if path.suffix == ".csv":
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  else:
    rows = []
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except ValueError:
            raise UserError(f"{path}:{n} is not JSON: use one JSON object per line") from None
  merged = {}
  for n, row in enumerate(rows, 1):
    key = next((k for k in PATH_KEYS if k in row), None)
    if key is None:
      raise UserError(f"{path} row {n} has no image path column (one of {', '.join(PATH_KEYS)})")
    merged.setdefault(str(row[key]), []).extend(_captions_of(row))
  return list(merged.items())


def prepare_image(data, size):
  """Encoded image -> JPEG bytes of RGB with the shorter side `size` (aspect kept, as
  img2dataset's keep_ratio: training crops at random from the whole picture, evaluation
  center-crops)."""
  rgb = transforms.decode_image(data)  # BadRecord if broken
  im = Image.fromarray(rgb)
  w, h = im.size
  if min(w, h) != size:
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
  buf = io.BytesIO()
  im.save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _folder_items(images_dir, rows):
  for rel, captions in rows:
    path = Path(images_dir) / rel
    try:
      data = path.read_bytes()
    except OSError:
      data = b""
    yield data, captions, {"source": rel}


def _tar_items(tar_path):
  """webdataset samples of one tar, in member order."""
  groups, order = {}, []
  with tarfile.open(tar_path) as tar:
    for member in tar:
      if not member.isfile():
        continue
      name = os.path.basename(member.name)
      key = os.path.join(os.path.dirname(member.name), name.split(".", 1)[0])
      ext = "." + name.split(".", 1)[1].lower() if "." in name else ""
      if key not in groups:
        groups[key] = {}
        order.append(key)
      groups[key][ext] = tar.extractfile(member).read()
  for key in order:
    g = groups[key]
    image = next((g[e] for e in IMAGE_EXTS if e in g), b"")
    captions = []
    if ".txt" in g:
      captions = transforms.clean_captions(g[".txt"].decode("utf-8", "replace"))
    elif ".json" in g:
      try:
        captions = _captions_of(json.loads(g[".json"]))
      except ValueError:
        captions = []
    yield image, captions, {"source": f"{os.path.basename(tar_path)}:{key}"}


def _tfds_source(spec):
  """(name or folder, data_dir, split) -> a random-access TFDS data source."""
  import tensorflow_datasets as tfds
  name, data_dir, split = spec
  try:
    if Path(name, "dataset_info.json").is_file():
      return tfds.builder_from_directory(name).as_data_source(split)
    return tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # TFDS raises many types for unknown names/splits/formats.
    raise UserError(f"cannot open TFDS dataset '{name}' split '{split}' ({type(e).__name__}: "
                    f"{e}); prepare it in ArrayRecord format (file_format='array_record')"
                    ) from None


def tfds_keys(source, image_key=None, caption_key=None):
  """The image and caption feature names of a TFDS source (given, or the first of each)."""
  import tensorflow_datasets as tfds
  feats = source.dataset_info.features
  def first(kind):
    for k, f in feats.items():
      inner = f.feature if isinstance(f, tfds.features.Sequence) else f
      if isinstance(inner, kind):
        return k
    return None
  image_key = image_key or first(tfds.features.Image)
  caption_key = caption_key or first(tfds.features.Text)
  for role, key in (("image", image_key), ("caption", caption_key)):
    if key is None or key.split("/")[0] not in feats:  # "captions/text": a nested feature
      raise UserError(f"TFDS features {sorted(feats)} have no {role} feature {key!r}: pass "
                      f"--{role}-key")
  return image_key, caption_key


def _feature(example, key):
  for part in key.split("/"):
    example = example[part]
  return example


def _tfds_items(spec, keys, start, stop):
  source = _tfds_source(spec)
  for i in range(start, stop):
    ex = source[i]
    buf = io.BytesIO()
    try:
      Image.fromarray(_feature(ex, keys[0])).save(buf, "PNG")
    except Exception:  # A malformed image array: left out like an undecodable file.
      buf = io.BytesIO()
    captions = _feature(ex, keys[1])
    if hasattr(captions, "tolist"):  # numpy array of bytes from a Sequence(Text)
      captions = captions.tolist()
    yield buf.getvalue(), _captions_of({"caption": captions}), {"source": f"{spec[0]}:{i}"}


def _write_shard(job):
  """Writes one shard (a tuple of plain data, so it pickles into worker processes)."""
  out_dir, name, kind, arg, image_size = job
  from array_record.python.array_record_module import ArrayRecordWriter
  items = {"tar": _tar_items, "folder": _folder_items, "tfds": _tfds_items}[kind](
      *((arg,) if kind == "tar" else arg))
  tmp = Path(out_dir) / (name + ".tmp")
  writer = ArrayRecordWriter(str(tmp), "group_size:1")
  count = skipped = 0
  try:
    for data, captions, meta in items:
      try:
        if not captions:
          raise transforms.BadRecord("no caption")
        image = prepare_image(data, image_size)
      except transforms.BadRecord:
        skipped += 1
        continue
      writer.write(msgpack.packb({"image": image, "captions": captions, "meta": meta}))
      count += 1
  finally:
    writer.close()
  os.replace(tmp, Path(out_dir) / name)
  done = {"records": count, "skipped": skipped, "sha256": sources.file_sha256(Path(out_dir) / name)}
  (Path(out_dir) / (name + ".done")).write_text(json.dumps(done))
  return name, done


def plan(out_dir, split, *, images=None, captions=None, tars=None, tfds=None,
         tfds_data_dir=None, tfds_split=None, image_key=None, caption_key=None,
         shard_size=1000, image_size=224):
  """-> [job] for `_write_shard`, one per output shard, in order."""
  if tfds:
    spec = (str(tfds), tfds_data_dir and str(tfds_data_dir), tfds_split or split)
    source = _tfds_source(spec)
    keys = tfds_keys(source, image_key, caption_key)
    parts = [("tfds", (spec, keys, i, min(i + shard_size, len(source))))
             for i in range(0, len(source), shard_size)]
  elif tars:
    missing = [t for t in tars if not Path(t).is_file()]
    if missing:
      raise UserError(f"tar shard '{missing[0]}' not found")
    parts = [("tar", str(Path(t).resolve())) for t in tars]
  elif images and captions:
    if not Path(images).is_dir():
      raise UserError(f"image folder '{images}' not found")
    rows = read_caption_file(captions)
    parts = [("folder", (str(images), rows[i:i + shard_size]))
             for i in range(0, len(rows), shard_size)]
  else:
    raise UserError("give --images DIR --captions FILE, --tars FILE..., or --tfds NAME")
  n = len(parts)
  return [(str(out_dir), f"{split}-{k:05d}-of-{n:05d}.array_record", kind, arg, image_size)
          for k, (kind, arg) in enumerate(parts)]


def convert(out_dir, *, split="train", images=None, captions=None, tars=None, tfds=None,
            tfds_data_dir=None, tfds_split=None, image_key=None, caption_key=None,
            shard_size=1000, image_size=224, tokenizer=None, workers=None, vocab_size=49408,
            progress=True):
  """Converts the inputs to `out_dir` (resuming a previous run); returns the manifest."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  jobs = plan(out_dir, split, images=images, captions=captions, tars=tars, tfds=tfds,
              tfds_data_dir=tfds_data_dir, tfds_split=tfds_split, image_key=image_key,
              caption_key=caption_key, shard_size=shard_size, image_size=image_size)
  (out_dir / sources.MANIFEST).unlink(missing_ok=True)  # Unfinished until written again.
  done = {}
  for job in jobs:
    note = out_dir / (job[1] + ".done")
    if note.is_file() and (out_dir / job[1]).is_file():
      done[job[1]] = json.loads(note.read_text())
  todo = [j for j in jobs if j[1] not in done]
  workers = workers if workers is not None else min(len(todo), os.cpu_count() or 1)
  with tqdm(total=len(jobs), initial=len(done), desc=f"convert {split}", unit="shard",
            disable=not progress) as bar:
    if workers > 1 and len(todo) > 1:
      with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for name, note in pool.imap_unordered(_write_shard, todo):
          done[name] = note
          bar.update()
    else:
      for job in todo:
        name, note = _write_shard(job)
        done[name] = note
        bar.update()
  names = [j[1] for j in jobs]
  if not sum(done[n]["records"] for n in names):
    raise UserError("no usable records: every image failed to decode or had no caption")
  tok_name = _tokenizer(out_dir, split, names, tokenizer, vocab_size)
  manifest = {
      "format": sources.FORMAT, "name": out_dir.name, "image_size": int(image_size),
      "tokenizer": tok_name,
      "source": {"images": str(images) if images else None,
                 "captions": str(captions) if captions else None,
                 "tars": [str(t) for t in tars] if tars else None,
                 "tfds": str(tfds) if tfds else None},
      "splits": {split: {
          "files": names, "num_records": sum(done[n]["records"] for n in names),
          "sha256": {n: done[n]["sha256"] for n in names},
          "shard_records": {n: done[n]["records"] for n in names},
          "skipped": sum(done[n]["skipped"] for n in names)}},
  }
  (out_dir / sources.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
  for n in names:
    (out_dir / (n + ".done")).unlink()
  if progress:
    s = manifest["splits"][split]
    print(f"converted {s['num_records']} records ({s['skipped']} skipped) into {len(names)} "
          f"shards in '{out_dir}'")
  return manifest


def _tokenizer(out_dir, split, names, tokenizer, vocab_size):
  """Copies the given tokenizer file in, or trains a BPE on the converted captions."""
  if tokenizer:
    src = Path(tokenizer)
    if not src.exists():
      raise UserError(f"tokenizer '{src}' not found")
    tokenizers.load_tokenizer(src, 8)  # Fails now, with its path, if unusable.
    dest = out_dir / ("tokenizer" + (src.suffix if src.is_file() else ""))
    if src.is_dir():
      import shutil
      shutil.copytree(src, dest, dirs_exist_ok=True)
    elif src.resolve() != dest.resolve():
      dest.write_bytes(src.read_bytes())
    return dest.name
  if (out_dir / "tokenizer.json").is_file():
    return "tokenizer.json"  # Trained by an earlier run of the same conversion.
  from array_record.python.array_record_module import ArrayRecordReader
  texts = []
  for n in names:
    reader = ArrayRecordReader(str(out_dir / n))
    texts += [c for raw in reader.read_all() for c in msgpack.unpackb(raw)["captions"]]
    reader.close()
  tokenizers.train_bpe(texts, out_dir / "tokenizer.json", vocab_size=vocab_size)
  return "tokenizer.json"

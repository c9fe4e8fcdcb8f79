"""`jaxret data convert`: the user's image-text data -> ArrayRecord shards + manifest.json
(sources.py's "jaxret-records-v1"), into a data dir that holds any number of splits.

Inputs:
  captions  --images DIR --captions FILE: a caption file in any layout caption_formats.py
            reads (JSONL, CSV, COCO captions_*.json, Karpathy dataset_*.json, Flickr30k
            results.csv), recognised from its content or named with --format. A Karpathy file
            (or --karpathy FILE) holds every split: one command writes train (train + restval),
            val and test, or the one --split names; its image paths must all exist.
  tar       --tars A.tar B.tar ...: webdataset samples, consecutive members sharing a key (the
            name up to the first dot): an image (.jpg/.jpeg/.png/.webp) and a caption (.txt, or
            .json with "caption"/"captions"/"text"). Read as a stream (compressed tars too), so
            memory does not grow with the tar.
  tfds      --tfds NAME or a prepared dataset folder (--tfds-data-dir, --tfds-split): any TFDS
            dataset with an image and a text (or sequence of texts) feature, read with
            `tfds.data_source` (ArrayRecord files, no TensorFlow); --image-key/--caption-key
            pick the features (default: the first image and the first text feature).
Each image is made RGB, resized (shorter side --image-size, aspect kept) and stored as JPEG
(quality 95); a JPEG at least twice that size is decoded at 1/2, 1/4 or 1/8 scale first (PIL's
draft mode: DCT-domain scaling, several times faster) and then resized exactly. Images that
cannot be decoded or have no caption are left out and counted in the manifest ("skipped").

Splits: converting a split adds it to the data dir, or replaces it, and leaves the others as
they are. The tokenizer shipped with the first split serves the later ones (a different
--tokenizer is refused), and all splits share one --image-size.

Each split is staged in `<split>.partial/` inside the data dir: shards in parallel
(processes), each to a temporary name, then renamed with a small ".done" note (records, sha256,
what it was made from); a rerun after an interruption keeps finished shards and writes only the
rest, so records are never duplicated. When every split of the command is staged, the shards
move into the data dir and the manifest is merged (temp file + os.replace, under a lock on the
folder): a split being replaced stays listed and readable until its replacement is complete,
and an error before that point leaves the data dir as it was.
"""

import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import tarfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import msgpack
from PIL import Image
from tqdm import tqdm

from jaxret import storage
from jaxret.data import caption_formats, sources, tokenizer_training, tokenizers, transforms
from jaxret.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # becomes part of file names


def prepare_image(data, size, draft=True):
  """Encoded image -> JPEG bytes of RGB with the shorter side `size` (aspect kept, as
  img2dataset's keep_ratio: training crops at random from the whole picture, evaluation
  center-crops). `draft=False` decodes large JPEGs at full size (only to compare)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      resample = Image.BICUBIC
      if draft and im.format == "JPEG" and min(im.size) >= 2 * size:
        # The decoder scales by 1/2, 1/4 or 1/8 while keeping both sides >= size; what is
        # left is a downscale by less than 2, where bilinear (PIL's, antialiased) is as close
        # to the full decode's bicubic as bicubic is (tests/test_data_formats.py) and faster.
        im.draft("RGB", (size, size))
        resample = Image.BILINEAR
      im.load()  # Decode now: a truncated file fails here.
      im = transforms.to_rgb(im)
      w, h = im.size
      if min(w, h) != size:
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
      buf = io.BytesIO()
      im.save(buf, "JPEG", quality=95)
      return buf.getvalue()
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
    raise transforms.BadRecord(f"undecodable image ({type(e).__name__}: {e})") from None


def _folder_items(images_dir, rows):
  for rel, captions, meta in rows:
    path = Path(images_dir) / rel
    try:
      data = path.read_bytes()
    except OSError:
      data = b""
    yield data, captions, {"source": rel, **meta}


def _tar_sample(tar_path, key, group):
  image = next((group[e] for e in IMAGE_EXTS if e in group), b"")
  captions = []
  if ".txt" in group:
    captions = transforms.clean_captions(group[".txt"].decode("utf-8", "replace"))
  elif ".json" in group:
    try:
      captions = caption_formats.captions_of(json.loads(group[".json"]))
    except ValueError:
      captions = []
  return image, captions, {"source": f"{os.path.basename(tar_path)}:{key}"}


def _tar_items(tar_path):
  """webdataset samples of one tar, in member order; only the current sample is in memory."""
  key, group, count = None, {}, 0
  try:
    with tarfile.open(tar_path, "r|*") as tar:  # a stream: no seeking, any compression
      for member in tar:
        tar.members = []  # tarfile keeps every header it has read; a stream never needs them
        if not member.isfile():
          continue
        name = os.path.basename(member.name)
        k = os.path.join(os.path.dirname(member.name), name.split(".", 1)[0])
        if k != key:
          if group:
            yield _tar_sample(tar_path, key, group)
          key, group = k, {}
        ext = "." + name.split(".", 1)[1].lower() if "." in name else ""
        group[ext] = tar.extractfile(member).read()
        count += 1
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise UserError(f"tar shard '{tar_path}' is damaged ({type(e).__name__}: {e}; {count} "
                    "members read before): download it again, or leave it out") from None
  if group:
    yield _tar_sample(tar_path, key, group)


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


def tfds_label_key(source):
  """The ClassLabel feature a TFDS source's records are labelled by ("label", else the
  first), or None: zero-shot evaluation reads it from each record's meta "label"."""
  import tensorflow_datasets as tfds
  feats = source.dataset_info.features
  labels = [k for k, f in feats.items() if isinstance(f, tfds.features.ClassLabel)]
  return "label" if "label" in labels else (labels[0] if labels else None)


def _feature(example, key):
  for part in key.split("/"):
    example = example[part]
  return example


def _tfds_items(spec, keys, start, stop):
  source = _tfds_source(spec)
  label_key = tfds_label_key(source)
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
    meta = {"source": f"{spec[0]}:{i}"}
    if label_key is not None:
      meta["label"] = int(ex[label_key])
    yield buf.getvalue(), caption_formats.captions_of({"caption": captions}), meta


def _fingerprint(job):
  """What a shard is made from (kind, inputs, image size): a note for other inputs is stale."""
  return hashlib.sha256(json.dumps(job[2:], default=str).encode()).hexdigest()[:16]


def _write_shard(job):
  """Writes one shard (a tuple of plain data, so it pickles into worker processes)."""
  out_dir, name, kind, arg, image_size = job
  from array_record.python.array_record_module import ArrayRecordWriter
  Path(out_dir).mkdir(parents=True, exist_ok=True)
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
  done = {"records": count, "skipped": skipped, "job": _fingerprint(job),
          "sha256": sources.file_sha256(Path(out_dir) / name)}
  (Path(out_dir) / (name + ".done")).write_text(json.dumps(done))
  return name, done


def _check_images(images, captions, table):
  """Every image a Karpathy file names must exist (a wrong --images shows here, not as
  123,287 skipped records)."""
  paths = [Path(images) / row[0] for rows in table.values() for row in rows]
  missing = [p for p in paths if not p.is_file()]
  if missing:
    dirs = sorted({str(Path(row[0]).parent) for rows in table.values() for row in rows} - {"."})
    hold = " and ".join(d + "/" for d in dirs) if dirs else "the image files"
    raise UserError(f"{len(missing)} of {len(paths)} images named in '{captions}' are not under "
                    f"'{images}' (first: '{missing[0]}'): pass the folder holding {hold} as "
                    "--images")


def plan(out_dir, split=None, *, images=None, captions=None, caption_format=None, tars=None,
         tfds=None, tfds_data_dir=None, tfds_split=None, image_key=None, caption_key=None,
         shard_size=1000, image_size=224):
  """-> {split: [job]} for `_write_shard`, one job per output shard, in order; a split's
  shards are staged in `<out_dir>/<split>.partial/`. `split` None: the input's own splits
  (Karpathy files), else "train"."""
  if shard_size < 1 or image_size < 1:
    raise UserError(f"--shard-size {shard_size} and --image-size {image_size} must be positive")
  if tfds:
    spec = (str(tfds), tfds_data_dir and str(tfds_data_dir), tfds_split or split or "train")
    source = _tfds_source(spec)
    keys = tfds_keys(source, image_key, caption_key)
    parts = {split or "train": [("tfds", (spec, keys, i, min(i + shard_size, len(source))))
                                for i in range(0, len(source), shard_size)]}
  elif tars:
    missing = [t for t in tars if not Path(t).is_file()]
    if missing:
      raise UserError(f"tar shard '{missing[0]}' not found")
    parts = {split or "train": [("tar", str(Path(t).resolve())) for t in tars]}
  elif captions:
    if not images:
      raise UserError("--captions needs --images DIR: the folder its image paths start from")
    if not Path(images).is_dir():
      raise UserError(f"image folder '{images}' not found")
    layout, table = caption_formats.read(captions, caption_format)
    if None in table:
      table = {split or "train": table[None]}
    elif split is not None:
      if split not in table:
        merged = "; restval is part of train" if split == "restval" else ""
        raise UserError(f"split '{split}' is not in '{captions}' (it has {', '.join(table)}"
                        f"{merged}): pick one of those with --split, or leave --split out")
      table = {split: table[split]}
    if layout == "karpathy":
      _check_images(images, captions, table)
    parts = {s: [("folder", (str(images), rows[i:i + shard_size]))
                 for i in range(0, len(rows), shard_size)] for s, rows in table.items()}
  elif images:
    raise UserError("--images needs --captions FILE (or --karpathy FILE) naming its images")
  else:
    raise UserError("give --images DIR with --captions FILE or --karpathy FILE, --tars FILE..., "
                    "or --tfds NAME")
  jobs = {}
  for s, ps in parts.items():
    if not SPLIT_NAME.fullmatch(s):
      raise UserError(f"split name {s!r} cannot name files: use letters, digits, '_', '-', '.'")
    stage = str(Path(out_dir) / f"{s}.partial")
    jobs[s] = [(stage, f"{s}-{k:05d}-of-{len(ps):05d}.array_record", kind, arg, image_size)
               for k, (kind, arg) in enumerate(ps)]
  return jobs


def convert(out_dir, *, split=None, images=None, captions=None, caption_format=None,
            karpathy=None, tars=None, tfds=None, tfds_data_dir=None, tfds_split=None,
            image_key=None, caption_key=None, shard_size=1000, image_size=224, tokenizer=None,
            workers=None, vocab_size=49408, progress=True):
  """Converts the inputs into `out_dir`: adds (or replaces) their split(s), keeps the others,
  resumes an interrupted run. Returns the manifest."""
  if karpathy:
    if captions:
      raise UserError("give --karpathy FILE or --captions FILE, not both")
    captions, caption_format = karpathy, "karpathy"
  out_dir = Path(out_dir)
  jobs = plan(out_dir, split, images=images, captions=captions, caption_format=caption_format,
              tars=tars, tfds=tfds, tfds_data_dir=tfds_data_dir, tfds_split=tfds_split,
              image_key=image_key, caption_key=caption_key, shard_size=shard_size,
              image_size=image_size)
  if tokenizer:
    if not Path(tokenizer).exists():
      raise UserError(f"tokenizer '{tokenizer}' not found")
    tokenizers.load_tokenizer(tokenizer, 8)  # Fails now, with its path, if unusable.
  _check_compatible(out_dir, list(jobs), tokenizer, image_size)
  out_dir.mkdir(parents=True, exist_ok=True)
  source = {"images": str(images) if images else None,
            "captions": str(captions) if captions else None,
            "tars": [str(t) for t in tars] if tars else None,
            "tfds": str(tfds) if tfds else None}
  # Every split is staged before any is listed: a rerun after an interruption reuses the
  # finished shards of all of them, and an error leaves the data dir as it was.
  entries = {s: _stage_split(out_dir, s, split_jobs, workers=workers, progress=progress)
             for s, split_jobs in jobs.items()}
  first = next(iter(entries))  # train, for a Karpathy file: the tokenizer learns from it
  tok_name = _tokenizer(out_dir, out_dir / f"{first}.partial", entries[first]["files"],
                        tokenizer, vocab_size)
  for entry in entries.values():
    entry["source"] = source
  manifest = _commit(out_dir, entries, image_size, tok_name)
  for s, entry in entries.items():
    shutil.rmtree(out_dir / f"{s}.partial")
    if progress:
      print(f"converted {entry['num_records']} records ({entry['skipped']} skipped) into "
            f"{len(entry['files'])} shards: split '{s}' of '{out_dir}'")
  return manifest


def _read_manifest(out_dir):
  return sources.load_manifest(out_dir) if (out_dir / sources.MANIFEST).is_file() else None


def _check_compatible(out_dir, splits, tokenizer, image_size):
  """Splits kept from earlier conversions fix the image size and the tokenizer."""
  manifest = _read_manifest(out_dir)
  kept = [s for s in (manifest or {}).get("splits", {}) if s not in splits]
  if not kept:
    return
  kept_text = f"split{'s' * (len(kept) > 1)} {', '.join(kept)}"
  if manifest.get("image_size") and int(manifest["image_size"]) != int(image_size):
    raise UserError(f"data dir '{out_dir}' stores {manifest['image_size']} px images ({kept_text})"
                    f": convert with --image-size {manifest['image_size']}, or into a new folder")
  listed = manifest.get("tokenizer")
  if tokenizer and listed and not _same_tokenizer(tokenizer, out_dir / listed):
    raise UserError(f"data dir '{out_dir}' ships '{listed}' with its {kept_text}, and --tokenizer "
                    f"'{tokenizer}' differs: leave --tokenizer out to reuse it, or convert into a "
                    "new folder")


def _stage_split(out_dir, split, jobs, *, workers, progress):
  """Writes the split's shards not already finished into its staging folder; -> its manifest
  entry."""
  stage = out_dir / f"{split}.partial"
  done = {}
  for job in jobs:
    note = stage / (job[1] + ".done")
    if note.is_file() and (stage / job[1]).is_file():
      try:
        finished = json.loads(note.read_text())
      except ValueError:  # cut short while being written
        continue
      if finished.get("job") == _fingerprint(job):
        done[job[1]] = finished
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
  records = sum(done[n]["records"] for n in names)
  if not records:
    shutil.rmtree(stage, ignore_errors=True)
    raise UserError(f"no usable records for split '{split}': every image failed to decode or had "
                    "no caption (the data dir is unchanged)")
  return {"files": names, "num_records": records,
          "sha256": {n: done[n]["sha256"] for n in names},
          "shard_records": {n: done[n]["records"] for n in names},
          "skipped": sum(done[n]["skipped"] for n in names)}


@contextmanager
def _locked(folder):
  """An exclusive lock on `folder` (flock), for the manifest's read-merge-write."""
  fd = os.open(folder, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def _write_manifest(out_dir, manifest):
  storage.write_text(str(out_dir / sources.MANIFEST), json.dumps(manifest, indent=2) + "\n")


def _commit(out_dir, entries, image_size, tok_name):
  """Moves staged splits' shards in and lists them ({split: entry}), keeping every other
  split."""
  with _locked(out_dir):
    manifest = _read_manifest(out_dir) or {"format": sources.FORMAT, "name": out_dir.name,
                                           "splits": {}}
    manifest.update(image_size=int(image_size), tokenizer=tok_name)
    replaced = [s for s in entries if s in manifest["splits"]]
    if replaced:  # Unlisted while their files change, so no reader sees a mix.
      _write_manifest(out_dir, {**manifest, "splits": {
          k: v for k, v in manifest["splits"].items() if k not in entries}})
      for s in replaced:
        for name in set(manifest["splits"][s].get("files", [])) - set(entries[s]["files"]):
          (out_dir / name).unlink(missing_ok=True)
    for s, entry in entries.items():
      for name in entry["files"]:
        os.replace(out_dir / f"{s}.partial" / name, out_dir / name)
      manifest["splits"][s] = entry  # (a replaced split keeps its place)
    _write_manifest(out_dir, manifest)
  return manifest


def _tokenizer_files(src):
  """-> (name in the data dir, {path inside it ("" for a file): source file})."""
  src = Path(src)
  if src.is_dir():
    return "tokenizer", {str(p.relative_to(src)): p for p in sorted(src.rglob("*")) if p.is_file()}
  if src.name.endswith("vocab.json"):  # CLIP's pair: the merges file sits beside it
    return "tokenizer", {"vocab.json": src,
                         "merges.txt": src.with_name(src.name.replace("vocab.json", "merges.txt"))}
  return "tokenizer" + src.suffix, {"": src}


def _same_tokenizer(src, dest):
  name, files = _tokenizer_files(src)
  dest = Path(dest)
  return dest.name == name and all(
      (dest / rel if rel else dest).is_file() and
      (dest / rel if rel else dest).read_bytes() == path.read_bytes()
      for rel, path in files.items())


def _staged_captions(stage, names):
  """Every caption of the staged shards, one record at a time (BPE trains from a stream)."""
  from array_record.python.array_record_module import ArrayRecordReader
  for name in names:
    reader = ArrayRecordReader(str(stage / name))
    try:
      for _ in range(reader.num_records()):
        yield from msgpack.unpackb(reader.read())["captions"]
    finally:
      reader.close()


def _tokenizer(out_dir, stage, names, tokenizer, vocab_size):
  """The data dir's tokenizer: the first split's, the given one copied in, or a BPE trained
  on this split's captions."""
  listed = (_read_manifest(out_dir) or {}).get("tokenizer")
  if listed and (out_dir / listed).exists() and (
      not tokenizer or _same_tokenizer(tokenizer, out_dir / listed)):
    return listed
  if tokenizer:
    name, files = _tokenizer_files(tokenizer)
    dest = out_dir / name
    for rel, path in files.items():
      target = dest / rel if rel else dest
      if path.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return name
  if (out_dir / "tokenizer.json").is_file():
    return "tokenizer.json"  # Trained by an earlier, interrupted run of the same conversion.
  tmp = out_dir / "tokenizer.json.tmp"
  tokenizer_training.train_bpe(_staged_captions(stage, names), tmp, vocab_size=vocab_size)
  os.replace(tmp, out_dir / "tokenizer.json")
  return "tokenizer.json"

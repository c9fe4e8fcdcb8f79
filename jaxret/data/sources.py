"""Reading a built dataset: `manifest.json` plus ArrayRecord shards.

Layout of a data dir (format "jaxret-records-v1"):

  manifest.json   {"format": "jaxret-records-v1", "name": str,
                   "image_size": int (stored size: the images' shorter side),
                   "tokenizer": "tokenizer.json",
                   "splits": {split: {"files": [relative names], "num_records": int,
                                      "sha256": {file: hex digest}}},
                   ...dataset specific keys (the demo adds "source", "classes",
                   "colours", "cells", "params" and "max_text_len": the text
                   length that holds every caption with BOS and EOS)}
  tokenizer.json  an HF `tokenizers` file (see tokenizers.py)
  <split>-00000-of-0000N.array_record ...

Each ArrayRecord record is one image with its captions:

  msgpack.packb({
      "image": <encoded image bytes (PNG or JPEG)>,
      "captions": [str, ...],   # all valid descriptions; captions[0] is canonical
      "meta": {...},            # free-form; the demo stores
                                #   "items": [[class_name, colour, cell_name], ...]
                                #   (reading order) and "source_index": [int, ...]
  })

Training draws one caption per image per epoch; evaluation scores every caption.
"""

import hashlib
import json
from pathlib import Path

import grain
import msgpack

from jaxret.errors import UserError, did_you_mean

FORMAT = "jaxret-records-v1"
MANIFEST = "manifest.json"


def parse_mixture(entries):
  """("dir:weight", ...) -> [(dir, float weight)]; a bare "dir" weighs 1."""
  out = []
  for entry in entries:
    path, sep, weight = str(entry).rpartition(":")
    if not sep or "/" in weight:  # no weight given (or the ':' was part of the path)
      path, weight = str(entry), "1"
    try:
      w = float(weight)
    except ValueError:
      w = float("nan")
    if not w > 0:
      raise UserError(f"data.mixture entry '{entry}' needs a positive weight: write 'dir:weight', "
                      "e.g. 'laion:0.7'")
    out.append((path, w))
  return out


def load_manifest(data_dir):
  """Returns the parsed manifest of `data_dir`, or raises UserError saying how to get one."""
  path = Path(data_dir) / MANIFEST
  if not path.is_file():
    raise UserError(
        f"data dir '{data_dir}' has no {MANIFEST}: build the demo data with "
        f"`jaxret data demo --out {data_dir}` or point --config.data.dir at a converted dataset")
  try:
    manifest = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"manifest '{path}' is not valid JSON ({e}): rebuild the dataset") from None
  fmt = manifest.get("format") if isinstance(manifest, dict) else None
  if fmt != FORMAT:
    raise UserError(f"manifest '{path}' has format {fmt!r}, expected '{FORMAT}': "
                    "rebuild or reconvert the dataset with this version of jaxret")
  return manifest


def split_files(data_dir, split, manifest=None):
  """Absolute paths of `split`'s shards, checked to exist."""
  manifest = manifest or load_manifest(data_dir)
  splits = manifest.get("splits", {})
  if split not in splits:
    raise UserError(f"split '{split}' is not in '{Path(data_dir) / MANIFEST}'"
                    f"{did_you_mean(split, splits)}; valid splits: {', '.join(sorted(splits))}")
  paths = [Path(data_dir) / name for name in splits[split]["files"]]
  for path in paths:
    if not path.is_file():
      raise UserError(f"shard '{path}' listed in the manifest is missing: "
                      "rebuild the dataset (the demo: `jaxret data demo --out DIR`)")
  return paths


def open_split(data_dir, split):
  """Random-access source of `split`'s raw records (bytes; see `decode_record`).

  Every shard is opened and counted here, so an unreadable or truncated one fails now, with
  its path, not mid-run (a damaged ArrayRecord file opens fine but reports no records).
  """
  manifest = load_manifest(data_dir)
  paths = split_files(data_dir, split, manifest)
  from array_record.python.array_record_module import ArrayRecordReader
  counts = {}
  for path in paths:
    try:
      reader = ArrayRecordReader(str(path))
      counts[path] = reader.num_records()
      reader.close()
    except Exception as e:  # array_record raises RuntimeError/OSError with C++ status text.
      counts[path] = f"{type(e).__name__}: {e}"
    want = manifest["splits"][split].get("shard_records", {}).get(path.name)
    if isinstance(counts[path], str) or counts[path] == 0 or want not in (None, counts[path]):
      raise UserError(f"shard '{path}' cannot be read (found {counts[path]} records"
                      f"{'' if want is None else f', the manifest says {want}'}): the file is "
                      "damaged or truncated; reconvert or re-copy it")
  total, want = sum(counts.values()), manifest["splits"][split].get("num_records")
  if want is not None and total != want:
    raise UserError(f"split '{split}' of '{data_dir}' has {total} records in its shards but the "
                    f"manifest says {want}: a shard was replaced or truncated; reconvert")
  return grain.sources.ArrayRecordDataSource([str(p) for p in paths])


def decode_record(raw):
  """Raw record bytes -> {"image": PNG bytes, "captions": [str], "meta": {...}}."""
  try:
    record = msgpack.unpackb(raw)
  except Exception as e:  # msgpack raises several unrelated types for bad bytes.
    raise UserError(f"corrupt record ({type(e).__name__}: {e}): rebuild the dataset") from None
  if not isinstance(record, dict) or "image" not in record or not record.get("captions"):
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise UserError(f"record is not a {FORMAT} record (has {keys}; needs 'image' and "
                    "non-empty 'captions'): rebuild the dataset")
  return record


def file_sha256(path):
  """The hex sha256 of a file, read in 1 MiB blocks (manifests record one per shard)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()

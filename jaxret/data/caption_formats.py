"""Caption files people have -> rows (image path under --images, [captions], meta), by split.

Layouts, recognised from the file's content (or named with `--format`):
  jsonl      one JSON object a line: an image path ("image", "path", "file", "file_name",
             "filename" or "image_path") and "captions" (a list) or "caption"/"text"/"sentences";
  csv        the same columns under a header row;
  coco       COCO's captions_<split>.json: {"images": [{"id", "file_name", ...}],
             "annotations": [{"image_id", "id", "caption"}]}, several captions per image;
  karpathy   Karpathy's split files (dataset_coco.json, dataset_flickr30k.json, ..._flickr8k):
             {"images": [{"filepath" (COCO only), "filename", "split", "sentences": [{"raw",
             "tokens"}]}], "dataset"}; every split is in the one file: "train" and "restval"
             become train (as the papers that use these files do), then "val" and "test";
  flickr30k  Kaggle's Flickr30k results.csv: "image_name| comment_number| comment", five rows
             per image.
Rows naming the same image are merged, captions in file order. `read` returns {split: rows};
layouts without splits use the key None (the caller names the split).
"""

import csv
import json
from pathlib import Path

from jaxret.data import transforms
from jaxret.errors import UserError

LAYOUTS = ("jsonl", "csv", "coco", "karpathy", "flickr30k")
CAPTION_KEYS = ("captions", "caption", "text", "sentences")
PATH_KEYS = ("image", "path", "file", "file_name", "filename", "image_path")
FLICKR30K_HEADER = ["image_name", "comment_number", "comment"]
KARPATHY_SPLITS = {"restval": "train"}  # Karpathy's extra COCO training images.
SPLIT_ORDER = ("train", "val", "test")


def _unknown(path):
  return UserError(
      f"caption file '{path}' is in no layout jaxret reads: use JSONL or CSV rows with an image "
      f"path column ({', '.join(PATH_KEYS)}) and caption(s), COCO captions_*.json, Karpathy "
      "dataset_*.json or Flickr30k results.csv (or name the layout with --format)")


def captions_of(row):
  """The usable captions of a dict row (a JSON line, CSV row, webdataset .json, ...)."""
  if not isinstance(row, dict):
    return []
  for key in CAPTION_KEYS:
    if key in row and row[key] not in (None, ""):
      value = row[key]
      if isinstance(value, str) and value.startswith("["):  # a CSV cell holding a JSON list
        try:
          value = json.loads(value)
        except ValueError:
          pass
      return transforms.clean_captions(value)
  return []


def _merge(path, rows):
  """[(image, captions, meta)] -> the same, one row per image in first-seen order."""
  merged = {}
  for image, captions, meta in rows:
    if image in merged:
      merged[image][1].extend(captions)
    else:
      merged[image] = (image, list(captions), meta)
  return list(merged.values())


def _path_rows(path, rows):
  for n, row in enumerate(rows, 1):
    key = next((k for k in PATH_KEYS if k in row), None) if isinstance(row, dict) else None
    if key is None:
      raise UserError(f"{path} row {n} has no image path column (one of {', '.join(PATH_KEYS)})")
    yield str(row[key]), captions_of(row), {}


def _read_jsonl(path, _):
  def rows():
    with open(path, encoding="utf-8-sig") as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            yield json.loads(line)
          except ValueError:
            raise UserError(f"{path}:{n} is not JSON: use one JSON object per line") from None
  return {None: _merge(path, _path_rows(path, rows()))}


def _read_csv(path, _):
  with open(path, newline="", encoding="utf-8-sig") as f:
    return {None: _merge(path, _path_rows(path, csv.DictReader(f)))}


def _read_flickr30k(path, _):
  rows = []
  with open(path, encoding="utf-8-sig") as f:
    next(f, None)  # the header
    for n, line in enumerate(f, 2):
      if not line.strip():
        continue
      parts = [p.strip() for p in line.rstrip("\r\n").split("|", 2)]
      if len(parts) == 2:  # The Kaggle file has a row missing its second '|': 'x.jpg| 4 A dog'.
        number, _, text = parts[1].partition(" ")
        if number.isdigit():
          parts = [parts[0], number, text]
      if len(parts) != 3 or not parts[0]:
        raise UserError(f"{path}:{n} is not 'image_name| comment_number| comment': fix or drop "
                        "the line")
      rows.append((parts[0], transforms.clean_captions(parts[2]), {}))
  return {None: _merge(path, rows)}


def _read_coco(path, doc):
  try:
    rows = {im["id"]: (im["file_name"], [], {"image_id": im["id"]}) for im in doc["images"]}
  except (KeyError, TypeError):
    raise UserError(f"'{path}' has 'images' entries without 'id' and 'file_name': use COCO's "
                    "captions_<split>.json as downloaded") from None
  dangling = []
  for ann in doc["annotations"]:
    if not isinstance(ann, dict) or "caption" not in ann:
      raise UserError(f"'{path}' is a COCO file whose annotations have no 'caption' (instances "
                      "or keypoints?): use captions_<split>.json")
    row = rows.get(ann.get("image_id"))
    if row is None:
      dangling.append(ann.get("image_id"))
    else:
      row[1].extend(transforms.clean_captions(ann["caption"]))
  if dangling:
    raise UserError(f"'{path}': {len(dangling)} captions name image ids missing from 'images' "
                    f"(first: {dangling[0]!r}): the file is incomplete; download it again")
  return {None: list(rows.values())}


def _read_karpathy(path, doc):
  splits = {}
  for n, im in enumerate(doc["images"]):
    try:
      image = "/".join(p for p in (im.get("filepath"), im["filename"]) if p)
      split = KARPATHY_SPLITS.get(im["split"], im["split"])
      captions = transforms.clean_captions([s["raw"] for s in im["sentences"]])
    except (KeyError, TypeError, AttributeError):
      raise UserError(f"'{path}' image {n} lacks Karpathy's 'filename', 'split' or "
                      "'sentences'[].'raw': use the dataset_*.json files as downloaded") from None
    image_id = im.get("cocoid", im.get("imgid"))
    splits.setdefault(split, []).append(
        (image, captions, {} if image_id is None else {"image_id": image_id}))
  order = [s for s in SPLIT_ORDER if s in splits] + [s for s in splits if s not in SPLIT_ORDER]
  return {s: _merge(path, splits[s]) for s in order}


def _load_json(path):
  try:
    with open(path, encoding="utf-8-sig") as f:
      # Karpathy's "tokens" lists are not used: dropped as parsed, which halves the memory.
      return json.load(f, object_hook=lambda d: (d.pop("tokens", None), d)[1])
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"caption file '{path}' is not valid JSON ({e}): download it again") from None


def _is_coco(doc):
  return (isinstance(doc, dict) and isinstance(doc.get("images"), list)
          and isinstance(doc.get("annotations"), list))


def _is_karpathy(doc):
  images = doc.get("images") if isinstance(doc, dict) else None
  return (isinstance(images, list) and "annotations" not in doc
          and all(isinstance(im, dict) and "sentences" in im for im in images[:1]))


def detect(path):
  """-> (layout, the parsed JSON document for coco/karpathy, else None); UserError if none."""
  with open(path, "rb") as f:
    head = f.read(1 << 16).decode("utf-8", "replace").lstrip("\ufeff")
  text = head.lstrip()
  if text.startswith("{"):
    try:
      first = json.loads(text.split("\n", 1)[0])
    except ValueError:
      first = None  # a pretty-printed document, or a first line longer than `head`
    if isinstance(first, dict) and "images" not in first:
      return "jsonl", None
    doc = _load_json(path)
    for layout, test in (("coco", _is_coco), ("karpathy", _is_karpathy)):
      if test(doc):
        return layout, doc
    raise _unknown(path)
  header = text.split("\n", 1)[0].rstrip("\r")
  if [c.strip() for c in header.split("|")] == FLICKR30K_HEADER:
    return "flickr30k", None
  if any(c.strip() in PATH_KEYS for c in next(csv.reader([header]), [])):
    return "csv", None
  raise _unknown(path)


def read(path, layout=None):
  """-> (layout, {split or None: [(image path, [captions], meta)]}); see the module doc."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"caption file '{path}' not found")
  if layout in (None, "auto"):
    layout, doc = detect(path)
  elif layout in ("coco", "karpathy"):
    doc = _load_json(path)
    if not (_is_coco if layout == "coco" else _is_karpathy)(doc):
      raise UserError(f"'{path}' is not a {layout} caption file (see `jaxret data convert "
                      "--help`): drop --format to detect its layout")
  elif layout in LAYOUTS:
    doc = None
  else:
    raise UserError(f"caption layout {layout!r} is unknown: use one of {', '.join(LAYOUTS)}")
  reader = {"jsonl": _read_jsonl, "csv": _read_csv, "coco": _read_coco,
            "karpathy": _read_karpathy, "flickr30k": _read_flickr30k}[layout]
  return layout, reader(path, doc)

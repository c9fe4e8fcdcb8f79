"""The class names of a data set, for zero-shot classification, and each record's label.

Where a data set's classes come from (the first that applies):
  a class file (eval.zeroshot_classes): one class per line, `NAME`, or `KEY<TAB>NAME` where
      KEY is what the records' labels say (an ImageNet folder such as 'n01440764') and NAME
      goes into the prompts ('tench'); blank lines and lines starting with '#' are skipped;
  the manifest's "classes" (the split's, else the data set's): the demo's (its manifest also
      has "cells") or a converter's;
  the TFDS data set the split was converted from (its "source"."tfds" in the manifest a
      prepared TFDS folder, as `data convert --tfds DIR` records it): the names of its
      ClassLabel feature ("label", else the first ClassLabel).

A record's label (`Classes.label`):
  the demo (manifest "cells"): meta "items" [[class name, colour, cell], ...], several per image;
  otherwise meta "label" (an index into the classes, or a KEY), else, for data converted from
      an image folder (its "source"."images"), the name of the folder holding the image
      (meta "source" is its path under that folder: 'dog/0001.jpg' -> 'dog').
"""
import dataclasses
from pathlib import Path, PurePosixPath

from jaxret.errors import UserError


@dataclasses.dataclass(frozen=True)
class Classes:
  names: tuple   # what the prompts say
  keys: tuple    # what the records' labels say (the names unless a class file gives keys)
  origin: str    # where they came from, for messages
  items: bool = False        # demo layout: labels are meta "items", several per image
  folder_labels: bool = False  # records without a label take their image folder's name

  def index(self, key, where):
    if isinstance(key, bool) or not isinstance(key, (int, str)):
      raise UserError(f"{where} has label {key!r}: a label is a class index or name")
    if isinstance(key, int):
      if not 0 <= key < len(self.keys):
        raise UserError(f"{where} has label {key}, outside the {len(self.keys)} classes of "
                        f"{self.origin}: use the matching class list")
      return key
    try:
      return self.keys.index(key)
    except ValueError:
      shown = ", ".join(self.keys[:8]) + (", ..." if len(self.keys) > 8 else "")
      raise UserError(f"{where} has label '{key}', which is not a class of {self.origin} "
                      f"({shown}): add it there") from None

  def label(self, meta, where):
    """The class index of a record (a list of them for the demo's items)."""
    if self.items:
      return [self.index(item[0], where) for item in meta.get("items", [])]
    if "label" in meta:
      return self.index(meta["label"], where)
    source = PurePosixPath(str(meta.get("source", "")))
    if self.folder_labels and len(source.parts) > 1:
      return self.index(source.parent.name, where)
    raise UserError(f"{where} has no label (meta 'label', or an image folder named for its "
                    f"class) for the classes of {self.origin}: convert the data with labels or "
                    "remove 'zeroshot' from eval.tasks")


def read_class_file(path):
  path = Path(path)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"eval.zeroshot_classes file '{path}' cannot be read ({e}): give a text file "
                    "with one class name per line") from None
  keys, names = [], []
  for line in lines:
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    key, tab, name = line.partition("\t")
    keys.append(key.strip())
    names.append((name if tab else key).strip())
  if not names:
    raise UserError(f"eval.zeroshot_classes file '{path}' lists no classes: one name per line")
  for seen, k in enumerate(keys):
    if k in keys[:seen]:
      raise UserError(f"eval.zeroshot_classes file '{path}' lists '{k}' twice: keep one")
  return tuple(keys), tuple(names)


def tfds_label_names(folder):
  """The names of a prepared TFDS folder's ClassLabel feature ("label", else the first), or
  None when it has none."""
  import tensorflow_datasets as tfds
  try:
    features = tfds.builder_from_directory(str(folder)).info.features
  except Exception as e:  # TFDS raises many types for a folder it cannot read
    raise UserError(f"cannot read the TFDS folder '{folder}' the data was converted from "
                    f"({type(e).__name__}: {e}): set eval.zeroshot_classes to a class file"
                    ) from None
  labels = {k: f for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)}
  feature = labels.get("label") or next(iter(labels.values()), None)
  return tuple(feature.names) if feature is not None else None


def _source(manifest, split):
  """What a split was converted from: the split's "source" (a manifest of several splits),
  else the manifest's ({} for the demo, whose "source" names its image set)."""
  for source in (manifest.get("splits", {}).get(split, {}).get("source"), manifest.get("source")):
    if isinstance(source, dict):
      return source
  return {}


def find_classes(data_dir, manifest, split, class_file=""):
  """The Classes of a split (see the module docstring), or None when nothing gives any."""
  source = _source(manifest, split)
  layout = dict(items="cells" in manifest, folder_labels=bool(source.get("images")))
  if class_file:
    keys, names = read_class_file(class_file)
    return Classes(names, keys, f"class file '{class_file}'", **layout)
  listed = manifest.get("splits", {}).get(split, {}).get("classes") or manifest.get("classes")
  if listed:
    names = tuple(str(c) for c in listed)
    return Classes(names, names, f"the manifest of '{data_dir}'", **layout)
  tfds_source = source.get("tfds")
  if tfds_source and Path(tfds_source, "dataset_info.json").is_file():
    names = tfds_label_names(tfds_source)
    if names:
      return Classes(names, names, f"TFDS '{tfds_source}'", **layout)
  return None


def describe_missing(data_dir, manifest, split):
  """Why find_classes found nothing, in a few words."""
  tfds_source = _source(manifest, split).get("tfds")
  if tfds_source and Path(tfds_source, "dataset_info.json").is_file():
    return f"data '{data_dir}' (from TFDS '{tfds_source}', which has no ClassLabel) has no classes"
  if tfds_source:
    return (f"data '{data_dir}' has no classes (its TFDS source '{tfds_source}' is not a "
            "prepared folder here to read label names from)")
  return f"data '{data_dir}' has no classes"

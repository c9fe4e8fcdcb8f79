"""The demo dataset: two tinted real items in a 2x2 grid, with exact captions.

A scene is a 64x64 RGB image, black background, split into four 32x32 cells
(top left, top right, bottom left, bottom right). Exactly two cells hold an item:
a 28x28 grayscale image (Fashion-MNIST, or scikit-learn's digits when Fashion-MNIST
is not installed) tinted with a named colour (rgb = gray / 255 * colour) and jittered
by up to 2 px inside its cell; nearly blank source images are skipped. The two
items always differ in (class, colour), so every caption names each item
unambiguously.

Captions are generated from the scene, never written by hand, so they are exact:
  "a red sneaker in the top left and a blue bag in the bottom right"   (canonical)
  "a blue bag in the bottom right and a red sneaker in the top left"
  "a red sneaker above and to the left of a blue bag"
  "a blue bag below and to the right of a red sneaker"
(same-row pairs say "to the left of"/"to the right of", same-column ones "above"/"below").

Held-out compositions: a scene's key is the sorted pair of (class, colour, cell)
triples. A stable hash puts ~10% of all keys in the test split. Train scenes only
use the other keys; test scenes use distinct test keys, so each test caption
matches exactly one test image and tests recombination, not memorisation.
Train scenes draw item pixels from the source's train images, test scenes from
its test images.
"""

import gzip
import hashlib
import io
import itertools
import json
from pathlib import Path

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image
from tqdm import tqdm

from jaxret.data import sources, tokenizer_training, tokenizers
from jaxret.errors import UserError, did_you_mean

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle boot")
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                 "nine")
SOURCES = ("auto", "fashion-mnist", "digits")
DEMO_TOKENIZER = "bpe-1"  # Bump when the demo tokenizer changes, so old builds are rebuilt.

COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255),
    "orange": (255, 165, 0), "white": (255, 255, 255),
}
CELLS = ("top left", "top right", "bottom left", "bottom right")  # Reading order; cell i
IMAGE_SIZE = 64                                                  # is at row i//2, col i%2.
CELL_SIZE = 32
ITEM_SIZE = 28
JITTER = 2
TEST_PERCENT = 10
# A few Fashion-MNIST images are nearly blank (under 0.3% have < 40 pixels at gray
# >= 64); a caption naming an invisible item would be wrong, so they are never drawn.
MIN_VISIBLE_PIXELS = 40
NUM_SHARDS = {"train": 4, "test": 1}


# ---------------------------------------------------------------- item sources


def _read_idx(path):
  """Parses a gzipped IDX file (the MNIST container) into a uint8 array."""
  raw = gzip.open(path).read()
  if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
    raise UserError(f"'{path}' is not a uint8 IDX file: reinstall dataset-fashion-mnist")
  ndim = raw[3]
  shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, offset=4))
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_available():
  return all((FASHION_MNIST_DIR / f).is_file()
             for files in FASHION_MNIST_FILES.values() for f in files)


def _load_fashion_mnist():
  pools = {}
  for split, (images, labels) in FASHION_MNIST_FILES.items():
    x, y = _read_idx(FASHION_MNIST_DIR / images), _read_idx(FASHION_MNIST_DIR / labels)
    pools[split] = (x, y.astype(np.int64), np.arange(len(y)))
  return FASHION_MNIST_CLASSES, pools


def _load_digits():
  try:
    from sklearn.datasets import load_digits
  except ImportError:
    raise UserError("the digits fallback needs scikit-learn: `pip install 'jaxret[demo]'` "
                    "or install Debian's dataset-fashion-mnist") from None
  digits = load_digits()
  # 8x8 in 0..16 -> 28x28 in 0..255, like an MNIST item.
  small = (digits.images * (255 / 16)).round().astype(np.uint8)
  x = np.stack([np.asarray(Image.fromarray(im).resize((ITEM_SIZE, ITEM_SIZE),
                                                      Image.BILINEAR)) for im in small])
  y = digits.target.astype(np.int64)
  # Fixed split, independent of the seed: every 5th image is a test image.
  index = np.arange(len(y))
  is_test = index % 5 == 0
  pools = {"train": (x, y, index[~is_test]), "test": (x, y, index[is_test])}
  return DIGIT_CLASSES, pools


def _resolve_source(source):
  if source not in SOURCES:
    raise UserError(f"unknown demo source '{source}'{did_you_mean(source, SOURCES)}; "
                    f"choose one of {', '.join(SOURCES)}")
  if source == "auto":
    return "fashion-mnist" if _fashion_mnist_available() else "digits"
  if source == "fashion-mnist" and not _fashion_mnist_available():
    raise UserError(f"Fashion-MNIST files not found under '{FASHION_MNIST_DIR}': "
                    "`apt-get install dataset-fashion-mnist`, or use source 'digits'")
  return source


# ---------------------------------------------------------------- compositions


def combination_key(items):
  """Canonical key of a scene: the sorted (class, colour, cell) name triples."""
  return tuple(sorted(tuple(item) for item in items))


def is_test_key(key):
  """Stable ~10% bucket: sha256 of the key's text, not Python's per-process hash()."""
  text = ";".join(",".join(triple) for triple in key)
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100 < TEST_PERCENT


def _all_scenes(classes):
  """Every valid scene as items in reading order: ((class, colour, cell), (...))."""
  looks = list(itertools.product(classes, COLOURS))
  scenes = []
  for cell_a, cell_b in itertools.combinations(CELLS, 2):
    for look_a, look_b in itertools.product(looks, looks):
      if look_a != look_b:
        scenes.append(((*look_a, cell_a), (*look_b, cell_b)))
  return scenes


# ---------------------------------------------------------------- captions


def _phrase(cls, colour):
  article = "an" if colour[0] in "aeiou" else "a"
  return f"{article} {colour} {cls}"


def captions_for(items):
  """All captions of a scene; `items` in reading order, so captions[0] is canonical."""
  (cls_a, colour_a, cell_a), (cls_b, colour_b, cell_b) = items
  a, b = _phrase(cls_a, colour_a), _phrase(cls_b, colour_b)
  caps = [f"{a} in the {cell_a} and {b} in the {cell_b}",
          f"{b} in the {cell_b} and {a} in the {cell_a}"]
  row_a, col_a = divmod(CELLS.index(cell_a), 2)
  row_b, col_b = divmod(CELLS.index(cell_b), 2)
  # Reading order: a is never below b, and is left of b when they share a row.
  a_to_b, b_to_a = [], []
  if row_a < row_b:
    a_to_b.append("above")
    b_to_a.append("below")
  if col_a < col_b:
    a_to_b.append("to the left of")
    b_to_a.append("to the right of")
  elif col_a > col_b:
    a_to_b.append("to the right of")
    b_to_a.append("to the left of")
  caps.append(f"{a} {' and '.join(a_to_b)} {b}")
  caps.append(f"{b} {' and '.join(b_to_a)} {a}")
  return caps


def _vocabulary_corpus(classes):
  """Texts that contain every word any caption can use (the tokenizer's vocabulary)."""
  phrases = [_phrase(c, k) for c in classes for k in COLOURS]
  pairs = [((classes[0], "red", a), (classes[1], "orange", b))
           for a, b in itertools.combinations(CELLS, 2)]
  return phrases + [c for pair in pairs for c in captions_for(pair)]


# ---------------------------------------------------------------- rendering


def _render(items, pixels, jitter):
  """items: reading-order triples; pixels: two uint8 [28,28]; jitter: int [2,2] in ±2."""
  scene = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for (_, colour, cell), gray, (dy, dx) in zip(items, pixels, jitter):
    row, col = divmod(CELLS.index(cell), 2)
    y = row * CELL_SIZE + (CELL_SIZE - ITEM_SIZE) // 2 + dy
    x = col * CELL_SIZE + (CELL_SIZE - ITEM_SIZE) // 2 + dx
    tint = np.asarray(COLOURS[colour], np.uint32)
    # Integer round(gray * c / 255): exact and the same on every machine.
    scene[y:y + ITEM_SIZE, x:x + ITEM_SIZE] = (gray[..., None] * tint + 127) // 255
  return scene


def _png(image):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _split_records(rng, scenes, pool, classes):
  """Yields msgpack records for `scenes`, drawing item pixels from `pool`."""
  images, labels, allowed = pool
  visible = (images[allowed] >= 64).reshape(len(allowed), -1).sum(1) >= MIN_VISIBLE_PIXELS
  allowed = allowed[visible]
  by_class = [allowed[labels[allowed] == c] for c in range(len(classes))]
  class_id = {c: i for i, c in enumerate(classes)}
  picks = rng.random((len(scenes), 2))
  jitters = rng.integers(-JITTER, JITTER + 1, size=(len(scenes), 2, 2))
  for items, pick, jitter in zip(scenes, picks, jitters):
    choices = [by_class[class_id[cls]] for cls, _, _ in items]
    index = [int(ch[int(p * len(ch))]) for ch, p in zip(choices, pick)]
    image = _render(items, [images[i] for i in index], jitter)
    yield msgpack.packb({
        "image": _png(image),
        "captions": captions_for(items),
        # source_index: rows of the source's image array of this split (Fashion-MNIST's
        # train or t10k file; load_digits() for digits) that were drawn.
        "meta": {"items": [list(t) for t in items], "source_index": index},
    })


def _write_shards(out_dir, split, records, num_records, bar):
  num_shards = max(1, min(NUM_SHARDS[split], num_records))
  names = [f"{split}-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)]
  writers = [ArrayRecordWriter(str(out_dir / n), "group_size:1") for n in names]
  try:
    for i, record in enumerate(records):
      writers[i * num_shards // num_records].write(record)  # Contiguous, equal-size shards.
      bar.update()
  finally:
    for w in writers:
      w.close()
  return {"files": names, "num_records": num_records, "sha256": {n: sources.file_sha256(out_dir / n)
                                                                 for n in names}}


def _remove_stale_shards(out_dir, splits):
  """Deletes our shard files from an earlier build with another shard count."""
  current = {f for s in splits.values() for f in s["files"]}
  for split in splits:
    for path in out_dir.glob(f"{split}-*-of-*.array_record"):
      if path.name not in current:
        path.unlink()


# ---------------------------------------------------------------- builder


def _max_text_len(chosen, tokenizer):
  """Ids (with BOS and EOS) that hold every caption untruncated: a text_len hint."""
  captions = sorted({c for scenes in chosen.values() for s in scenes for c in captions_for(s)})
  return 2 + max(len(e.ids) for e in tokenizer.encode_batch(captions, add_special_tokens=False))


def _existing(out_dir, params):
  """The manifest of a finished build with the same parameters, else None."""
  try:
    manifest = sources.load_manifest(out_dir)
  except UserError:
    return None
  if manifest.get("params") != params:
    return None
  files = [f for s in manifest["splits"].values() for f in s["files"]]
  if not all((out_dir / f).is_file() for f in files + [manifest["tokenizer"]]):
    return None
  return manifest


def build_demo(out_dir, *, num_train=40000, num_test=1000, seed=0, source="auto",
               progress=True):
  """Builds the demo dataset into `out_dir` and returns its manifest.

  Does nothing (and returns the existing manifest) when `out_dir` already holds a
  finished build with the same parameters. The manifest is written last, so an
  interrupted build is rebuilt next time.
  """
  if num_train < 1 or num_test < 1:
    raise UserError(f"demo sizes must be positive, got num_train={num_train}, "
                    f"num_test={num_test}")
  out_dir = Path(out_dir)
  source = _resolve_source(source)
  params = {"num_train": int(num_train), "num_test": int(num_test), "seed": int(seed),
            "source": source, "tokenizer": DEMO_TOKENIZER}
  manifest = _existing(out_dir, params)
  if manifest is not None:
    if progress:
      print(f"demo data ({source}) already built in '{out_dir}'; nothing to do")
    return manifest

  classes, pools = _load_fashion_mnist() if source == "fashion-mnist" else _load_digits()
  scenes = _all_scenes(classes)
  test_mask = np.array([is_test_key(combination_key(s)) for s in scenes])
  train_scenes = [s for s, t in zip(scenes, test_mask) if not t]
  test_scenes = [s for s, t in zip(scenes, test_mask) if t]
  if num_test > len(test_scenes):
    raise UserError(f"num_test={num_test} is more than the {len(test_scenes)} held-out "
                    f"combinations of the {source} demo: ask for fewer test scenes")

  rng = np.random.default_rng(seed)
  # Train draws keys with replacement from the non-test keys (same as rejecting test
  # keys); test draws distinct test keys so each test caption has one true image.
  chosen = {
      "train": [train_scenes[i] for i in rng.integers(len(train_scenes), size=num_train)],
      "test": [test_scenes[i] for i in rng.choice(len(test_scenes), num_test, replace=False)],
  }

  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / sources.MANIFEST).unlink(missing_ok=True)  # Mark the dir unfinished.
  # The same trainer as `jaxret data train-tokenizer`; the corpus is small, so every demo
  # word ends up one token (hyphenated words kept whole, as captions count them).
  tokenizer = tokenizer_training.train_bpe(
      _vocabulary_corpus(classes), out_dir / "tokenizer.json", vocab_size=4096, min_frequency=1,
      word_pattern=tokenizers.WORD_OR_PUNCT)
  splits = {}
  with tqdm(total=num_train + num_test, desc=f"demo scenes ({source})", unit="scene",
            disable=not progress) as bar:
    for split, scenes_ in chosen.items():
      records = _split_records(rng, scenes_, pools[split], classes)
      splits[split] = _write_shards(out_dir, split, records, len(scenes_), bar)

  _remove_stale_shards(out_dir, splits)
  manifest = {
      "format": sources.FORMAT, "name": "demo", "source": source, "image_size": IMAGE_SIZE,
      "tokenizer": "tokenizer.json", "classes": list(classes), "colours": list(COLOURS),
      "cells": list(CELLS), "max_text_len": _max_text_len(chosen, tokenizer), "params": params,
      "splits": splits,
  }
  (out_dir / sources.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
  if progress:
    size = sum((out_dir / f).stat().st_size for s in splits.values() for f in s["files"])
    print(f"demo data: {num_train} train + {num_test} test scenes of {source} items "
          f"({size / 2**20:.1f} MiB) in '{out_dir}'")
  return manifest

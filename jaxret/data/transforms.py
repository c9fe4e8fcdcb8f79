"""Per-element grain transforms: raw record -> {"image": uint8 [S,S,3], "text": int32}.

All are top-level classes holding only plain data (paths, ints), so they pickle
into grain worker processes once those are turned on.
"""

import io

import grain
import numpy as np
from PIL import Image

from jaxret.data import augment, caption_swaps, sources, teacher_store, tokenizers
from jaxret.errors import UserError


def to_rgb(im):
  """Any PIL mode -> 8-bit RGB: 16-bit/float gray rescaled, alpha composited on white,
  CMYK/palette/gray converted."""
  if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    a = np.asarray(im, np.float32)
    scale = 257.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
    im = Image.fromarray(np.clip(a / scale, 0, 255).astype(np.uint8), "L")
  if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
    im = im.convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(white, im)
  return im if im.mode == "RGB" else im.convert("RGB")  # (convert would copy an RGB image)


def clean_captions(captions):
  """Usable captions: strings (bytes decoded as UTF-8), stripped, that keep some text after the
  tokenizers' cleanup (open_clip's: an '&nbsp;' caption has none). They stay otherwise raw: the
  tokenizer cleans what it encodes, and cleaning twice would unescape '&amp;amp;' once too many."""
  if isinstance(captions, (str, bytes)):
    captions = [captions]
  if not isinstance(captions, (list, tuple)):
    return []
  out = []
  for c in captions:
    if isinstance(c, bytes):
      c = c.decode("utf-8", errors="replace")
    if isinstance(c, str) and c.strip() and tokenizers.clean_text(c):
      out.append(c.strip())
  return out


class BadRecord(Exception):
  """A record training skips (undecodable image, no usable caption...)."""


def decode_image(data):
  """Encoded image bytes -> uint8 [H,W,3]; BadRecord if it cannot be fully decoded."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # Decode now: a truncated file fails here, not later.
      return np.asarray(to_rgb(im))
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
    raise BadRecord(f"undecodable image ({type(e).__name__}: {e})") from None


class DecodeRecord(grain.transforms.Map):
  """Raw bytes -> {"image": uint8 [H,W,3] at the stored size, "captions": [str]}.

  With `skip_bad`, a record that cannot be used becomes {"bad": reason} (for SkipBad below)
  instead of raising. With `keep_meta`, the record's "meta" dict comes along (HardNegatives);
  with `keep_teacher`, its stored teacher embeddings (TeacherView).
  """

  def __init__(self, skip_bad=False, keep_meta=False, keep_teacher=False):
    self.skip_bad, self.keep_meta, self.keep_teacher = skip_bad, keep_meta, keep_teacher

  def decode(self, element):
    """-> (uint8 image [H,W,3], captions); BadRecord when unusable."""
    try:
      record = sources.decode_record(element)
    except UserError as e:
      raise BadRecord(str(e)) from None
    captions = clean_captions(record["captions"])
    if not captions:
      raise BadRecord(f"no usable caption in {record['captions']!r:.80}")
    if not isinstance(record["image"], bytes):
      raise BadRecord(f"image is {type(record['image']).__name__}, not encoded bytes")
    return decode_image(record["image"]), captions, record

  def map(self, element):
    try:
      image, captions, record = self.decode(element)
    except BadRecord as e:
      if self.skip_bad:
        return {"bad": str(e)}
      raise UserError(f"bad record: {e}; reconvert the data") from None
    out = {"image": image, "captions": captions}
    if self.keep_meta:
      out["meta"] = record.get("meta") or {}
    if self.keep_teacher:
      out["teacher"] = record.get("teacher")
    return out


class CenterCrop(grain.transforms.Map):
  """Evaluation view (augment.resize_center_crop); also training without augmentation."""

  def __init__(self, size):
    self.size = int(size)

  def map(self, element):
    if "bad" in element:
      return element
    return {**element, "image": augment.resize_center_crop(element["image"], self.size)}


class DropBad(grain.transforms.Filter):
  """Evaluation: leaves broken records out (the order of the rest is unchanged)."""

  def filter(self, element):
    return "bad" not in element


MAX_BAD_RUN = 1000  # Consecutive broken records before we call the data broken, not noisy.


class SkipBad(grain.MapDataset):
  """Element i is record i if usable, else the next usable record of the order (i+1, ...),
  marked "skipped": 1 so the record is counted once, at its own position.

  A deterministic rule of the index, so batches stay the same for any number of processes
  and resume exactly.
  """

  def __init__(self, parent):
    super().__init__(parent)

  def __len__(self):
    return len(self._parent)

  def __str__(self):
    return "SkipBad"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    for j in range(MAX_BAD_RUN):
      element = self._parent[index + j]
      if "bad" not in element:
        return {**element, "skipped": np.int32(j > 0)}
    raise UserError(f"{MAX_BAD_RUN} broken records in a row (the last: {element['bad']}): "
                    "the data set is broken; reconvert it")


class TrainView(grain.transforms.RandomMap):
  """Training example from grain's per-element rng: one of the record's captions (a record is
  visited once per epoch, so one caption per image per epoch) and the image view, a random
  resized crop with `augment` = dict(crop_scale, crop_ratio, flip), else the evaluation view."""

  def __init__(self, size, augment=None):
    self.size = int(size)
    self.augment = None if augment is None else (
        tuple(augment["crop_scale"]), tuple(augment["crop_ratio"]), bool(augment["flip"]))

  def random_map(self, element, rng):
    captions = element["captions"]
    out = {k: v for k, v in element.items() if k != "captions"}
    out["caption"] = captions[rng.integers(len(captions))]
    if self.augment is None:
      out["image"] = augment.resize_center_crop(element["image"], self.size)
    else:
      out["image"] = augment.random_resized_crop(element["image"], rng, self.size, *self.augment)
    return out


class TeacherView(grain.transforms.RandomMap):
  """Offline distillation's training example: one of the record's stored views (its crop box
  and flip, made again here) with the teacher's embedding of it, and one caption with the
  teacher's embedding of that caption (data/teacher_store.py)."""

  def __init__(self, size):
    self.size = int(size)

  def random_map(self, element, rng):
    views, image_emb, text_emb = teacher_store.stored({"teacher": element["teacher"]})
    captions = element["captions"]
    if len(text_emb) != len(captions):
      raise UserError(f"a record has {len(captions)} captions but teacher embeddings of "
                      f"{len(text_emb)}: remake the data with `jaxret data teacher`")
    v, c = int(rng.integers(len(views))), int(rng.integers(len(captions)))
    out = {k: val for k, val in element.items() if k not in ("captions", "teacher")}
    out["image"] = teacher_store.apply_view(element["image"], views[v], self.size)
    out["caption"] = captions[c]
    out["teacher_image_emb"], out["teacher_text_emb"] = image_emb[v], text_emb[c]
    return out


class TokenizeTeacher(grain.transforms.Map):
  """Adds "teacher_text": the caption in the teacher's tokenizer (online distillation with a
  teacher whose tokenizer is not the student's)."""

  def __init__(self, tokenizer_path, max_len):
    self.tokenize = None
    self.tokenizer_path, self.max_len = str(tokenizer_path), int(max_len)

  def map(self, element):
    if self.tokenize is None:
      self.tokenize = Tokenize(self.tokenizer_path, self.max_len)
    return {**element, "teacher_text": self.tokenize.tokenizer.encode(element["caption"])}


class HardNegatives(grain.transforms.RandomMap):
  """Adds "neg_captions": `k` swapped variants of the example: on the demo, other scenes from
  its metadata phrased as the chosen caption (caption_swaps.demo_swaps_like: negatives in one
  fixed template let the text tower learn "that template is negative", which inverted the
  relation accuracy in a first run), else word swaps of the caption. The swap types take turns
  from a random first one, so k >= 3 covers attribute, object and relation alike (pooling them
  would draw relations rarely: the demo has 1 against up to 17 object variants); within a
  type, variants are drawn without repeats until it runs out. With none at all (no swappable
  word), the caption's words in another order stand in, as NegCLIP's shuffled negatives."""

  def __init__(self, k, classes=None):
    self.k = int(k)
    self.classes = tuple(classes) if classes else None

  def random_map(self, element, rng):
    out = {key: v for key, v in element.items() if key != "meta"}
    caption = element["caption"]
    meta = element.get("meta") or {}
    like = (caption_swaps.demo_swaps_like(meta["items"], caption, classes=self.classes)
            if "items" in meta else None)
    if like is None:
      like = caption_swaps.swaps_for_record(meta, caption, None, rng, classes=self.classes)
    groups = [list(g) for g in like.values() if g]
    if not groups:
      words = caption.split()
      shuffled = " ".join(words[i] for i in rng.permutation(len(words)))
      groups = [[shuffled if shuffled != caption else " ".join(reversed(words))]]
    for g in groups:
      rng.shuffle(g)
    first = int(rng.integers(len(groups)))
    negatives = []
    for i in range(self.k):
      g = groups[(first + i) % len(groups)]
      negatives.append(g[(i // len(groups)) % len(g)])
    out["neg_captions"] = negatives
    return out


class Tokenize(grain.transforms.Map):
  """Replaces "caption" by "text", int32 [max_len] (and "neg_captions" by "neg_text",
  int32 [k, max_len])."""

  def __init__(self, tokenizer_path, max_len):
    self.tokenizer_path = str(tokenizer_path)
    self.max_len = int(max_len)
    self._tokenizer = None

  def __getstate__(self):
    # Ship the path, not the HF object: each worker process loads its own.
    return {**self.__dict__, "_tokenizer": None}

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = tokenizers.load_tokenizer(self.tokenizer_path, self.max_len)
    return self._tokenizer

  def map(self, element):
    out = {k: v for k, v in element.items() if k not in ("caption", "neg_captions")}
    out["text"] = self.tokenizer.encode(element["caption"])
    if "neg_captions" in element:
      out["neg_text"] = np.stack([self.tokenizer.encode(c) for c in element["neg_captions"]])
    return out


def collate(elements):
  """Stacks arrays into a batch; keeps string fields (captions) as a list."""
  return {key: (np.stack([e[key] for e in elements]) if isinstance(elements[0][key], np.ndarray)
                else [e[key] for e in elements])
          for key in elements[0]}

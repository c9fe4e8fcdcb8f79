"""Per-element grain transforms: raw record -> {"image": float32 [-1,1], "text": int32}.

All are top-level classes holding only plain data (paths, ints), so they pickle
into grain worker processes once those are turned on.
"""

import io

import grain
import numpy as np
from PIL import Image

from jaxret.data import sources, tokenizers
from jaxret.errors import UserError


class DecodeRecord(grain.transforms.Map):
  """Raw bytes -> {"image": float32 [H,W,3] in [-1,1], "captions": [str]}."""

  def __init__(self, image_size):
    self.image_size = int(image_size)

  def map(self, element):
    record = sources.decode_record(element)
    with Image.open(io.BytesIO(record["image"])) as im:
      image = np.asarray(im.convert("RGB"), np.float32)
    if image.shape[:2] != (self.image_size, self.image_size):
      # Caught here, not as a shape error deep in batching or in the model.
      raise UserError(f"record image is {image.shape[1]}x{image.shape[0]} but the manifest "
                      f"says image_size {self.image_size}: fix the manifest or reconvert")
    return {"image": image / 127.5 - 1.0, "captions": list(record["captions"])}


class RandomCaption(grain.transforms.RandomMap):
  """Training: one of the record's captions, drawn from grain's per-element rng."""

  def random_map(self, element, rng):
    captions = element["captions"]
    return {"image": element["image"], "caption": captions[rng.integers(len(captions))]}


class FirstCaption(grain.transforms.Map):
  """Evaluation: the canonical caption, so every run scores the same text."""

  def map(self, element):
    return {"image": element["image"], "caption": element["captions"][0]}


class Tokenize(grain.transforms.Map):
  """Adds "text" int32 [max_len]; drops "caption" unless `keep_caption`."""

  def __init__(self, tokenizer_path, max_len, keep_caption=False):
    self.tokenizer_path = str(tokenizer_path)
    self.max_len = int(max_len)
    self.keep_caption = keep_caption
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
    out = {"image": element["image"], "text": self.tokenizer.encode(element["caption"])}
    if self.keep_caption:
      out["caption"] = element["caption"]
    return out


def collate(elements):
  """Stacks arrays into a batch; keeps string fields (captions) as a list."""
  return {key: (np.stack([e[key] for e in elements]) if isinstance(elements[0][key], np.ndarray)
                else [e[key] for e in elements])
          for key in elements[0]}

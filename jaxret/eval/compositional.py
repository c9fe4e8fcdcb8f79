"""Compositional evaluation: does the model prefer an image's true caption to the same caption
with one thing swapped?

Each image's first caption (the demo's canonical one) is scored against swapped variants of it
(jaxret/data/caption_swaps.py; the demo's from its scene, other data's from word lists), by the
score retrieval ranks image->text with: the pooled cosine, or for late-interaction models
FILIP's s^I (mean over image tokens of the best caption token). Per swap type:
  accuracy     share of (image, variant) pairs where the true caption scores strictly higher
               (a tie counts against the model)
  chance       0.5: one pairwise comparison
  images       images with at least one variant of the type; no_variants: the others, left out
  pairs        (image, variant) pairs scored
"mean" averages the accuracies of the types that have pairs.
"""
import dataclasses

import numpy as np

from jaxret.data import caption_swaps
from jaxret.eval import late_interaction

TYPES = caption_swaps.TYPES
CHANCE = 0.5
# Variants per image and type: bounds the extra captions embedded (at most 3 x this per image).
MAX_PER_TYPE = 4


@dataclasses.dataclass(frozen=True)
class Plan:
  ids: np.ndarray    # [V, L] token ids of the variants
  image: np.ndarray  # [V] the image each variant belongs to
  kind: np.ndarray   # [V] its swap type, an index into TYPES
  num_images: int


def plan(records, encode, classes=None, k=MAX_PER_TYPE):
  """records: (first caption, meta) per image; encode: list of str -> ids [n, L]. Variants whose
  ids equal their true caption's (the swapped word cut off by the text length) are dropped:
  the two could only tie."""
  texts, image, kind = [], [], []
  for i, (caption, meta) in enumerate(records):
    # One seed per image: an image's variants do not depend on the rest of the set.
    swaps = caption_swaps.swaps_for_record(meta, caption, k, np.random.default_rng(i),
                                           classes=classes)
    for t, name in enumerate(TYPES):
      texts += swaps[name]
      image += [i] * len(swaps[name])
      kind += [t] * len(swaps[name])
  ids = encode(texts) if texts else np.zeros((0, 0), np.int32)
  image, kind = np.asarray(image, np.int64), np.asarray(kind, np.int64)
  if texts:
    true_ids = encode([c for c, _ in records])
    keep = (ids != true_ids[image]).any(axis=1)
    ids, image, kind = ids[keep], image[keep], kind[keep]
  return Plan(ids, image, kind, len(records))


def candidates(image, kind, num_images):
  """Gallery rows per image, for a gallery of the true captions (row i: image i's) then the
  variants (row num_images + j: variant j): [n, 1 + m], column 0 the true caption, padded with
  it; and [n, m] the type of each variant column (-1: padding)."""
  counts = np.bincount(image, minlength=num_images)
  m = int(counts.max()) if len(image) else 0
  rows = np.repeat(np.arange(num_images)[:, None], 1 + m, axis=1)
  kinds = np.full((num_images, m), -1, np.int64)
  order = np.argsort(image, kind="stable")
  column = np.arange(len(image)) - np.repeat(np.cumsum(counts) - counts, counts)
  rows[image[order], 1 + column] = num_images + order
  kinds[image[order], column] = kind[order]
  return rows, kinds


def pair_scores(image, gallery, rows, late=False, block=1024):
  """[n, 1 + m] score of image i with gallery row rows[i, j]. image/gallery: embedder outputs
  ({"image_emb"}, {"text_emb"}; with late, also the token embeddings and masks)."""
  if late:
    return late_interaction.rerank_scores(image["image_tokens"], image["image_mask"],
                                          gallery["text_tokens"], gallery["text_mask"], rows)
  img, txt = image["image_emb"], gallery["text_emb"]
  return np.concatenate([np.einsum("nd,nkd->nk", img[lo:lo + block], txt[rows[lo:lo + block]])
                         for lo in range(0, len(rows), block)])


def accuracy(scores, kinds):
  """scores [n, 1 + m] (column 0: the true caption), kinds [n, m] (-1: no variant) -> the
  result described in the module docstring."""
  n = len(scores)
  wins = scores[:, 1:] < scores[:, :1]
  out = {}
  for t, name in enumerate(TYPES):
    mask = kinds == t
    images = int(mask.any(axis=1).sum())
    pairs = int(mask.sum())
    out[name] = {"accuracy": float(wins[mask].mean()) if pairs else None, "chance": CHANCE,
                 "images": images, "pairs": pairs, "no_variants": n - images}
  scored = [out[t]["accuracy"] for t in TYPES if out[t]["accuracy"] is not None]
  out["mean"] = float(np.mean(scored)) if scored else None
  return out

"""Zero-shot classification, CLIP style: a classifier made from text alone.

Each class c gets the mean of the L2-normalised embeddings of its prompts (every template
filled with the class name), normalised again; an image is assigned the classes with the
highest cosine to it.

Data with one label per image (a class file or a TFDS source's label names, see
jaxret/data/classes.py) is scored as one view:
  image  the whole image; plain top-k accuracy.

The demo's scenes hold two items, so two views are scored (both reported):
  scene  the whole image; top-k is a hit if any class present in the scene is among the k
         best (the multi-label "any item" reading; chance is reported beside it, since with
         two items it is not 1/C);
  item   each item alone: its cell kept and the other cells blacked out (the background the
         scenes have), so every image has exactly one class; plain top-k accuracy.
"""
import math

import numpy as np

# The prompts when eval.zeroshot_templates is (): the demo's captions read "a red sneaker in
# the top left and ...", so its prompts name a cell; anything else gets OpenAI's ImageNet style.
DEMO_TEMPLATES = ("a {}", "a {} in the top left", "a {} in the top right",
                  "a {} in the bottom left", "a {} in the bottom right")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_embeddings(embed_text, tokenizer, classes, templates):
  """[C, d]: per class, the normalised mean of its normalised prompt embeddings."""
  prompts = [t.format(c) for c in classes for t in templates]
  emb = embed_text(tokenizer.encode_batch(prompts))
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  mean = emb.reshape(len(classes), len(templates), -1).mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def top_k_hits(logits, labels, ks):
  """labels: one class index per row, or a list of sets (any of them counts).
  Ties count against the model: a class ranks below every class scoring >= it."""
  labels = [{int(l)} if np.ndim(l) == 0 else set(map(int, l)) for l in labels]
  out = {}
  for k in ks:
    hits = []
    for row, want in zip(logits, labels):
      true = np.isin(np.arange(len(row)), list(want))
      best = row[true].max()
      hits.append(np.sum((row >= best) & ~true) < k)
    out[f"top{k}"] = float(np.mean(hits)) if hits else 0.0
  return out


def chance(labels, num_classes, ks):
  """Expected top-k of a random ranking: 1 - C(C - p, k) / C(C, k), p true classes."""
  out = {}
  for k in ks:
    p = [len(set(np.atleast_1d(l))) for l in labels]
    out[f"top{k}"] = float(np.mean([1 - math.comb(num_classes - q, k) / math.comb(num_classes, k)
                                    for q in p])) if p else 0.0
  return out


def item_views(image, items, cells):
  """One image per item (uint8): that item's cell kept, the rest set to the black background."""
  size = image.shape[0] // 2
  views = []
  for _, _, cell in items:
    i = cells.index(cell)
    r, c = (i // 2) * size, (i % 2) * size
    view = np.zeros_like(image)
    view[r:r + size, c:c + size] = image[r:r + size, c:c + size]
    views.append(view)
  return views


def accuracy(image_emb, class_emb, labels, ks):
  ks = tuple(k for k in ks if k <= len(class_emb))
  logits = image_emb @ class_emb.T
  return {**top_k_hits(logits, labels, ks),
          "chance": chance(labels, len(class_emb), ks), "num_images": int(len(labels))}

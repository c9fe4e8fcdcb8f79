"""A loaded dual encoder, ready to embed: what `jaxret.load` returns.

Embedding goes through the evaluator's `Embedder` (jitted, one padded batch shape, split over
a data-parallel mesh of every local device), so a workdir's embeddings here are the ones its
evaluation ranks.
"""
import jax
import numpy as np

from jaxret.errors import UserError
from jaxret.eval.embed import Embedder
from jaxret.inference import images as images_mod
from jaxret.losses.filip import drop_special
from jaxret.parallel import partitioning

# Images decoded and cropped per round of embedding: bounds host memory for long lists.
CHUNK_BATCHES = 16


class Model:
  """encode_images / encode_texts -> L2-normalised float32 embeddings [n, d] (numpy).

  With tokens=True they return {"emb" [n,d], "tokens" [n,N,d], "mask" [n,N] bool}: FILIP's
  per-token embeddings, the mask leaving out padding (and the cls / end token when the run
  was trained without them, as its evaluation does).
  """

  def __init__(self, model, params, tokenizer, mesh, param_shardings, *, image_size,
               batch_size=64, drop_special_tokens=False, late_interaction=False, path=None,
               step=None):
    self.module, self.params, self.tokenizer, self.mesh = model, params, tokenizer, mesh
    self.image_size, self.path, self.step = int(image_size), path, step
    self.late_interaction = late_interaction
    self.drop_special_tokens = drop_special_tokens
    self.embed_dim = int(model.embed_dim)
    self._shardings, self._batch_size = param_shardings, batch_size
    self._embedders = {}
    with partitioning.activate(mesh):
      t = jax.jit(lambda p: model.apply({"params": p}, method="temperature"))(params)
    self.scale = float(t["scale"])
    self.bias = float(t["bias"]) if "bias" in t else None

  def __repr__(self):
    return (f"jaxret.Model({self.path!r}, step={self.step}, dim={self.embed_dim}, "
            f"image_size={self.image_size}, devices={self.mesh.size})")

  def _embedder(self, tokens):
    if tokens not in self._embedders:
      self._embedders[tokens] = Embedder(self.module, self.mesh, self._shardings,
                                         self._batch_size, tokens=tokens)
    return self._embedders[tokens]

  @property
  def batch_size(self):
    return self._embedder(False).batch_size

  def preprocess(self, image):
    """One image (PIL, uint8 array of any size, or a path) -> uint8 [S, S, 3], S the model's
    image size: the evaluation view."""
    return images_mod.preprocess(image, self.image_size)

  def encode_images(self, images, tokens=False):
    """Images (a list of PIL images / paths / uint8 arrays, or a uint8 array [n,H,W,3])."""
    images = images_mod.as_list(images)
    step = self.batch_size * CHUNK_BATCHES
    parts = []
    for lo in range(0, len(images), step):
      batch = np.stack([self.preprocess(im) for im in images[lo:lo + step]])
      parts.append(self.embed_arrays("image", batch, tokens))
    if not parts:
      raise UserError("encode_images got no images")
    return _concat(parts)

  def encode_texts(self, texts, tokens=False):
    """Texts (a list of strings, or one string) -> embeddings [n, d]."""
    if isinstance(texts, str):
      texts = [texts]
    if not len(texts):
      raise UserError("encode_texts got no texts")
    return self.embed_arrays("text", self.tokenizer.encode_batch(list(texts)), tokens)

  def embed_arrays(self, kind, array, tokens=False):
    """Already preprocessed input: uint8 images [n,S,S,3] or token ids [n,L]."""
    out = self._embedder(bool(tokens))(self.params, kind, array)
    emb = out[f"{kind}_emb"]
    if not tokens:
      return emb
    mask = out[f"{kind}_mask"].astype(bool)
    if self.drop_special_tokens:
      mask = np.asarray(drop_special(mask, out[f"{kind}_special"]))
    return {"emb": emb, "tokens": out[f"{kind}_tokens"], "mask": mask}

  def similarity(self, image_emb, text_emb):
    """[n_images, n_texts] logits: cosine x the model's logit scale (+ bias for sigmoid
    models), as the loss scored pairs in training."""
    a, b = np.asarray(_emb(image_emb), np.float32), np.asarray(_emb(text_emb), np.float32)
    s = self.scale * (a @ b.T)
    return s + self.bias if self.bias is not None else s


def _emb(x):
  return x["emb"] if isinstance(x, dict) else x


def _concat(parts):
  if isinstance(parts[0], dict):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return np.concatenate(parts)

"""The dual encoder: image tower + text tower + learnable temperature (and optional bias).

`TwoTower(...)(image, text, tokens=...)` returns a dict the losses read:
  image_emb [B, d], text_emb [B, d]       L2-normalised pooled embeddings
  image_tokens [B, Ni, d], image_mask     L2-normalised per-token embeddings (tokens=True only);
  text_tokens [B, Nt, d], text_mask       the same projection as the pooled vector, so FILIP
                                           and export share it; the mask covers the tokens up to
                                           and including the first end token (eos_id)
  image_special, text_special [B, N]       (tokens=True) the cls token (pool='cls') and the
                                           end token (first eos_id), for FILIP to leave out
  scale                                   exp(t), t the log-space temperature, capped at max_scale
  bias                                    the SigLIP bias (only when init_bias is set)
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxret.models.layers import logical, stack_layers, unstack_layers
from jaxret.models.text import TextTransformer
from jaxret.models.vit import ViT


def l2_normalize(x, eps=1e-6):
  x32 = x.astype(jnp.float32)
  return x32 / jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


class TwoTower(nn.Module):
  image: ViT
  text: TextTransformer
  embed_dim: int = 512
  image_proj: bool = True        # SigLIP uses the MAP head output directly (embed_dim == width).
  text_proj_bias: bool = False   # SigLIP's text head has a bias; CLIP's projection has none.
  init_scale: float = 1 / 0.07   # the multiplier; stored as its log (CLIP: 1/0.07, SigLIP: 10)
  init_bias: Optional[float] = None  # SigLIP: -10; None means no bias parameter
  max_scale: float = 100.0       # CLIP caps the multiplier at 100
  pad_id: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    if not self.image_proj and self.embed_dim != self.image.width:
      raise ValueError(f"image_proj=False needs embed_dim ({self.embed_dim}) == image width "
                       f"({self.image.width})")
    dense_init = logical(nn.initializers.lecun_normal(), ("embed", "joint"))
    if self.image_proj:
      self.img_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                               kernel_init=dense_init)
    self.txt_proj = nn.Dense(self.embed_dim, use_bias=self.text_proj_bias, dtype=self.dtype,
                             kernel_init=dense_init,
                             bias_init=logical(nn.initializers.zeros, ("joint",)))
    self.t = self.param("t", logical(nn.initializers.constant(math.log(self.init_scale)), ()), ())
    if self.init_bias is not None:
      self.b = self.param("b", logical(nn.initializers.constant(self.init_bias), ()), ())

  def encode_image(self, image, tokens=False):
    x, pooled = self.image(image)
    proj = self.img_proj if self.image_proj else (lambda v: v)
    out = {"image_emb": l2_normalize(proj(pooled))}
    if tokens:
      out["image_tokens"] = l2_normalize(proj(x))
      out["image_mask"] = jnp.ones(x.shape[:2], bool)
      is_cls = jnp.arange(x.shape[1]) == 0 if self.image.pool == "cls" else jnp.zeros(x.shape[1], bool)
      out["image_special"] = jnp.broadcast_to(is_cls, x.shape[:2])
    return out

  def encode_text(self, text, tokens=False):
    x, pooled = self.text(text)
    out = {"text_emb": l2_normalize(self.txt_proj(pooled))}
    if tokens:
      out["text_tokens"] = l2_normalize(self.txt_proj(x))
      is_eos = text == self.text.eos_id
      eos_before = jnp.cumsum(is_eos, axis=1) - is_eos  # end tokens strictly before
      # Up to and including the first end token: padding may be the end token itself (CLIP's
      # BPE pads with <|endoftext|>, SentencePiece without a pad piece with </s>), so
      # `text != pad_id` would drop it. Rows without one (not framed) drop only pad ids.
      out["text_mask"] = (eos_before == 0) & ((text != self.pad_id) | is_eos)
      out["text_special"] = is_eos & (eos_before == 0)  # the first one only
    return out

  def temperature(self):
    out = {"scale": jnp.exp(jnp.minimum(self.t, math.log(self.max_scale)))}
    if self.init_bias is not None:
      out["bias"] = self.b
    return out

  def __call__(self, image, text, tokens=False, neg_text=None):
    out = {**self.encode_image(image, tokens), **self.encode_text(text, tokens),
           **self.temperature()}
    if neg_text is not None:  # [B, k, L] hard negative captions, through the same text tower
      b, k = neg_text.shape[:2]
      neg = self.encode_text(neg_text.reshape(b * k, neg_text.shape[2]), tokens)
      out.update({f"neg_{key}": v.reshape(b, k, *v.shape[1:]) for key, v in neg.items()})
    return out


def build_model(model_cfg, *, vocab_size=None, pad_id=0, eos_id=2, attention=None) -> TwoTower:
  """A TwoTower from the `model` section of a config; vocabulary facts come from the tokenizer
  (or, for abstract shapes without data, from `model.text.vocab_size`). `attention` overrides
  `model.attention` (see models/attention.py for_platform)."""
  attention = attention or model_cfg.attention
  i, t = model_cfg.image, model_cfg.text
  dtype = jnp.dtype(model_cfg.dtype)  # compute dtype; parameters stay float32
  vocab_size = vocab_size or t.vocab_size
  if not vocab_size:
    raise ValueError("build_model needs vocab_size, from the tokenizer or model.text.vocab_size")
  image = ViT(patch_size=i.patch_size, width=i.width, depth=i.depth, num_heads=i.num_heads,
              mlp_dim=i.mlp_dim, pool=i.pool, pre_norm=i.pre_norm, patch_bias=i.patch_bias,
              act=model_cfg.act, ln_eps=model_cfg.ln_eps, dtype=dtype, remat=model_cfg.remat,
              scan=model_cfg.scan, mean=tuple(i.mean), std=tuple(i.std),
              attention=attention)
  text = TextTransformer(vocab_size=vocab_size, max_len=t.max_len, width=t.width, depth=t.depth,
                         num_heads=t.num_heads, mlp_dim=t.mlp_dim, causal=t.causal, pool=t.pool,
                         eos_id=eos_id, act=model_cfg.act, ln_eps=model_cfg.ln_eps, dtype=dtype,
                         remat=model_cfg.remat, scan=model_cfg.scan,
                         attention=attention)
  return TwoTower(image=image, text=text, embed_dim=model_cfg.embed_dim,
                  image_proj=model_cfg.image_proj, text_proj_bias=model_cfg.text_proj_bias,
                  init_scale=model_cfg.init_scale, init_bias=model_cfg.init_bias,
                  max_scale=model_cfg.max_scale, pad_id=pad_id, dtype=dtype)


def _map_encoders(params, fn):
  out = dict(params)
  for tower in ("image", "text"):
    if tower in out and "encoder" in out[tower]:
      out[tower] = {**out[tower], "encoder": fn(out[tower]["encoder"])}
  return out


def unscanned(params):
  """Params with scanned encoders laid out per block (blockNN/...): the one layout that
  export and import speak, whatever `model.scan` was."""
  return _map_encoders(params, unstack_layers)


def scanned(params):
  """The inverse of `unscanned`, for a model built with `model.scan=True`."""
  return _map_encoders(params, lambda e: e if "layers" in e else stack_layers(e))

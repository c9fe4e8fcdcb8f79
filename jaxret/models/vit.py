"""Vision Transformer image tower.

Returns the final-normed tokens and the pooled vector. The final LayerNorm is applied to every
token (it is per-token, so for cls pooling LN(x)[:, 0] equals CLIP's ln_post(x[:, 0])): the
same normed tokens feed pooling, FILIP token features and export.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxret.models.layers import Encoder, MAPHead, layer_norm, logical

POOLS = ("cls", "gap", "map")


class ViT(nn.Module):
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  pool: str = "cls"
  pre_norm: bool = False     # CLIP's ln_pre after the embeddings; SigLIP has none.
  patch_bias: bool = True    # CLIP's patch conv has no bias; SigLIP's has one.
  act: str = "gelu_tanh"
  ln_eps: float = 1e-5
  dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  attention: str = "xla"
  # Pixel normalisation of uint8 input: (x / 255 - mean) / std per channel (CLIP: OpenAI's
  # statistics; SigLIP: 0.5, i.e. [-1, 1]). Done here, on the device, so the data pipeline
  # ships uint8 and XLA fuses it into the patch embedding.
  mean: tuple = (0.5, 0.5, 0.5)
  std: tuple = (0.5, 0.5, 0.5)

  @nn.compact
  def __call__(self, image):
    """image [B, H, W, 3] -> (tokens [B, N, width] after the final LN, pooled [B, width]).

    uint8 pixels are normalised with `mean`/`std`; floats are taken as already normalised
    (what an exported model's image processor produces)."""
    if jnp.issubdtype(image.dtype, jnp.integer):
      mean, std = jnp.asarray(self.mean, jnp.float32), jnp.asarray(self.std, jnp.float32)
      image = (image.astype(jnp.float32) / 255.0 - mean) / std
    p = self.patch_size
    if image.shape[1] % p or image.shape[2] % p:
      raise ValueError(f"image size {image.shape[1:3]} is not divisible by patch_size {p}")
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias,
                dtype=self.dtype, name="patch_embed",
                kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                bias_init=logical(nn.initializers.zeros, ("embed",)))(image.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    if self.pool == "cls":
      cls = self.param("cls", logical(nn.initializers.zeros, (None, None, "embed")), (1, 1, d))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    pos = self.param("pos_embedding", logical(nn.initializers.normal(0.02), (None, "length", "embed")),
                     (1, x.shape[1], d))
    x = x + pos.astype(x.dtype)
    if self.pre_norm:
      x = layer_norm(self.ln_eps, "ln_pre", self.dtype)(x)
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.act, self.ln_eps, self.dtype,
                self.remat, self.scan, attention=self.attention, name="encoder")(x)
    x = layer_norm(self.ln_eps, "ln_post", self.dtype)(x)
    if self.pool == "cls":
      pooled = x[:, 0]
    elif self.pool == "gap":
      pooled = x.mean(axis=1)
    elif self.pool == "map":
      pooled = MAPHead(self.num_heads, self.mlp_dim, self.act, self.ln_eps, self.dtype,
                       name="map_head")(x)
    else:
      raise ValueError(f"unknown pool {self.pool!r}; valid: {', '.join(POOLS)}")
    return x, pooled

"""Text transformer tower.

Two published forms:
  * CLIP: causal attention, pooled at the end-of-text token (the first `eos_id` in the row).
  * SigLIP: bidirectional attention over the padded sequence, pooled at the last position.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxret.models.layers import Encoder, layer_norm, logical

POOLS = ("eos", "last")


class TextTransformer(nn.Module):
  vocab_size: int
  max_len: int = 77
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  causal: bool = True
  pool: str = "eos"
  eos_id: int = 2
  act: str = "gelu_tanh"
  ln_eps: float = 1e-5
  dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, text):
    """text [B, L] int32 -> (tokens [B, L, width] after the final LN, pooled [B, width])."""
    if text.shape[1] > self.max_len:
      raise ValueError(f"text length {text.shape[1]} exceeds max_len {self.max_len}")
    embed = nn.Embed(self.vocab_size, self.width, name="token_embedding", dtype=self.dtype,
                     embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")))
    # Gather whole rows (the table's FSDP shards all-gathered first, as for any weight):
    # a lookup from an embed-sharded table yields embed-sharded rows for every example,
    # which SPMD can only reshard to batch shards by replicating them. The rows keep the
    # parameter's own 'vocab' name: they stay split as the stored table is.
    table = nn.with_logical_constraint(embed.embedding, ("vocab", None))
    x = jnp.take(table, text, axis=0).astype(self.dtype)
    pos = self.param("pos_embedding", logical(nn.initializers.normal(0.01), (None, "length", "embed")),
                     (1, self.max_len, self.width))
    x = x + pos[:, :text.shape[1]].astype(x.dtype)
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.act, self.ln_eps, self.dtype,
                self.remat, self.scan, self.causal, self.attention, name="encoder")(x)
    x = layer_norm(self.ln_eps, "ln_final", self.dtype)(x)
    if self.pool == "eos":
      # First end-of-text token; rows without one (truncated input) pool their last position.
      is_eos = text == self.eos_id
      idx = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), text.shape[1] - 1)
      pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    elif self.pool == "last":
      pooled = x[:, -1]
    else:
      raise ValueError(f"unknown pool {self.pool!r}; valid: {', '.join(POOLS)}")
    return x, pooled

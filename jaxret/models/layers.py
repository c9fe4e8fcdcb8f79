"""Transformer pieces shared by the image and text towers.

Every parameter carries logical axis names ('embed', 'mlp', 'heads', 'kv', ...) and the
activations names of their own ('act_batch', 'act_length', 'act_embed', ...);
`jaxret.parallel.partitioning` maps them onto the mesh by the config's `mesh.rules`. Nothing
here knows the mesh.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxret.models.attention import attend

Dtype = Any

# The logical axis names the models use, the vocabulary of `mesh.rules` (a rule for any other
# name is refused at load). Activations are named apart from parameters: the same width is
# split over fsdp as a weight but not as an activation, whose batch already holds fsdp.
# tests/test_sharding_rules.py checks the models use exactly these.
PARAM_AXES = ("embed", "mlp", "heads", "kv", "vocab", "length", "joint", "layers")
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed", "act_mlp", "act_heads", "act_kv")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

ACTIVATIONS = {
    # Flax's default gelu is the tanh approximation (torch: gelu(approximate='tanh')).
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    # Exact GELU in PyTorch's form, x/2 (1 + erf(x/sqrt 2)): jax's own uses erfc(-x/sqrt 2),
    # which XLA:CPU expands into exp and selects, 13% of a small CLIP's train step.
    "gelu": lambda x: 0.5 * x * (1 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype))),
    # OpenAI CLIP's activation.
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def logical(init, axes):
  return nn.with_logical_partitioning(init, axes)


def layer_norm(eps, name, dtype=None):
  # Statistics are computed in float32 by flax whatever `dtype` (the output dtype) is.
  return nn.LayerNorm(
      epsilon=eps, name=name, dtype=dtype,
      scale_init=logical(nn.initializers.ones, ("embed",)),
      bias_init=logical(nn.initializers.zeros, ("embed",)))


class Attention(nn.Module):
  """Multi-head attention with per-head q/k/v kernels [D, H, Dh] and out kernel [H, Dh, D].
  `kv_mask` [B, Lk]: True for the keys to attend to; `implementation`: see models/attention.py
  (the parameters are the same whichever computes the product)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  causal: bool = False
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x_q, x_kv, kv_mask=None):
    d = x_q.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    dh = d // self.num_heads
    # Kernels are declared at their true per-head shapes (not as flat DenseGeneral kernels) so
    # the logical partitioning names apply to the array as stored and exported.
    def heads_in(name):
      w = self.param(f"{name}_kernel", logical(
          nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)), ("embed", "heads", "kv")),
          (d, self.num_heads, dh))
      b = self.param(f"{name}_bias", logical(nn.initializers.zeros, ("heads", "kv")),
                     (self.num_heads, dh))
      return w.astype(self.dtype), b.astype(self.dtype)

    (wq, bq), (wk, bk), (wv, bv) = heads_in("query"), heads_in("key"), heads_in("value")
    # Scaled before the logits (one multiply XLA fuses into q's bias add).
    q = (jnp.einsum("bld,dhk->blhk", x_q.astype(self.dtype), wq) + bq) * (dh ** -0.5)
    k = jnp.einsum("bld,dhk->blhk", x_kv.astype(self.dtype), wk) + bk
    v = jnp.einsum("bld,dhk->blhk", x_kv.astype(self.dtype), wv) + bv
    q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", "act_kv"))
    out = attend(q, k, v, causal=self.causal, kv_mask=kv_mask, implementation=self.implementation)
    wo = self.param("out_kernel", logical(
        nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")),
        (self.num_heads, dh, d))
    bo = self.param("out_bias", logical(nn.initializers.zeros, ("embed",)), (d,))
    return jnp.einsum("bqhk,hkd->bqd", out, wo.astype(self.dtype)) + bo.astype(self.dtype)


class Mlp(nn.Module):
  mlp_dim: int
  act: str = "gelu_tanh"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1",
                 kernel_init=logical(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                 bias_init=logical(nn.initializers.normal(1e-6), ("mlp",)))(x)
    h = ACTIVATIONS[self.act](h)
    h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
    return nn.Dense(d, dtype=self.dtype, name="fc2",
                    kernel_init=logical(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                    bias_init=logical(nn.initializers.normal(1e-6), ("embed",)))(h)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""
  num_heads: int
  mlp_dim: int
  act: str = "gelu_tanh"
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  causal: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, mask=None):
    """mask [B, L]: True for the tokens to attend to (None: all)."""
    y = layer_norm(self.ln_eps, "ln1", self.dtype)(x)
    x = x + Attention(self.num_heads, self.dtype, self.causal, self.attention, name="attn")(
        y, y, mask)
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    y = layer_norm(self.ln_eps, "ln2", self.dtype)(x)
    x = x + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(y)
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


# Named rematerialisation policies: what a block keeps from the forward pass for backward.
REMAT_POLICIES = {
    "none": None,                       # keep everything (no recomputation)
    "full": "nothing_saveable",         # keep only block inputs; recompute the whole block
    "dots": "checkpoint_dots",          # keep matmul outputs; recompute the elementwise rest
    "dots_no_batch": "checkpoint_dots_with_no_batch_dims",  # keep only weight-like matmuls
}


class _ScanLayer(nn.Module):
  """One step of the scanned encoder: (x, mask) -> (x, None), the block's params stacked."""
  block: Any

  @nn.compact
  def __call__(self, x, mask):
    return self.block(name="block")(x, mask), None


class Encoder(nn.Module):
  """`depth` pre-LN blocks, as a Python loop (params blockNN/...) or under `nn.scan` (params
  layers/block/... with a leading [depth] axis: one compiled body, faster compiles for deep
  models). `remat` names the policy for recomputing each block in the backward pass; `causal`
  and `attention` (the implementation, models/attention.py) go to every block's attention."""
  depth: int
  num_heads: int
  mlp_dim: int
  act: str = "gelu_tanh"
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  remat: str = "none"
  scan: bool = False
  causal: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, mask=None):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {self.remat!r}; valid: {', '.join(REMAT_POLICIES)}")
    block = Block
    if self.remat != "none":
      policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[self.remat])
      # Under scan the loop already separates iterations, so CSE prevention is not needed.
      block = nn.remat(Block, policy=policy, prevent_cse=not self.scan)
    make = functools.partial(block, self.num_heads, self.mlp_dim, self.act, self.ln_eps,
                             self.dtype, self.causal, self.attention)
    if self.scan:
      layers = nn.scan(_ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=nn.broadcast, length=self.depth,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = layers(make, name="layers")(x, mask)
      return x
    for i in range(self.depth):
      x = make(name=f"block{i:02d}")(x, mask)
    return x


def unstack_layers(encoder_params):
  """Scanned encoder params (layers/block/... with a leading depth axis) -> blockNN/... ."""
  if "layers" not in encoder_params:
    return encoder_params
  stacked = encoder_params["layers"]["block"]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  return {f"block{i:02d}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(depth)}


def stack_layers(encoder_params):
  """The inverse of `unstack_layers`: blockNN/... -> layers/block/... ."""
  names = sorted(k for k in encoder_params if k.startswith("block"))
  blocks = [encoder_params[k] for k in names]
  return {"layers": {"block": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}}


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision / SigLIP): a learned probe attends to the tokens."""
  num_heads: int
  mlp_dim: int
  act: str = "gelu_tanh"
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask: Optional[jax.Array] = None):
    """mask [B, N]: True for the tokens the probe may attend to (None: all)."""
    d = x.shape[-1]
    probe = self.param("probe", logical(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, d))
    probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, d))
    # Always xla: one query against N keys is a matrix-vector product that flash kernels do
    # not speed up (and splash's tiles would pad the single query to 128).
    x = Attention(self.num_heads, self.dtype, name="attn")(probe, x, mask)
    y = layer_norm(self.ln_eps, "ln", self.dtype)(x)
    x = x + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(y)
    return x[:, 0]

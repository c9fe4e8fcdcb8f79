"""The attention product softmax(q k^T) v, by one of three implementations (`model.attention`):

  xla     plain einsums; runs anywhere, the reference the others are tested against.
  cudnn   cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16 only).
  splash  the Pallas TPU splash-attention kernel, as MaxText uses it: one example at a time
          under vmap, sequences padded to its block size, padding kept out by segment ids.
          Off TPU it runs in Pallas interpret mode (slow: for tests only).

All take q, k, v [B, L, H, Dh] with q already scaled, `causal` (query i sees keys j <= i) and
`kv_mask` [B, Lk] (True: a real key), and return [B, Lq, H, Dh]. A query that sees no key at
all is left undefined (each implementation does its own thing), as no model here makes one.
"""
import jax
import jax.numpy as jnp

from jaxret.errors import UserError

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
# The splash kernel's tiles: its segment-id masking needs multiples of the 128 TPU lanes.
SPLASH_LANES = 128


def check_backend(implementation, platform, dtype):
  """Refuse, before anything compiles, an implementation the devices cannot run."""
  if implementation == "cudnn":
    if platform != "gpu":
      raise UserError(f"model.attention='cudnn' needs a GPU (found {platform}); use 'xla'")
    if dtype not in ("bfloat16", "float16"):
      raise UserError(f"model.attention='cudnn' needs model.dtype='bfloat16' (cuDNN flash "
                      f"attention has no {dtype} kernel); set it or use 'xla'")
  if implementation == "splash" and platform != "tpu":
    raise UserError(f"model.attention='splash' needs a TPU (found {platform}); use 'xla'"
                    f"{' or cudnn' if platform == 'gpu' else ''}")


def for_platform(implementation, platform, dtype):
  """What evaluation, export and loading compute with: the run's choice where these devices
  have it, else xla (the parameters are the same, so a TPU run still evaluates on a laptop)."""
  try:
    check_backend(implementation, platform, dtype)
  except UserError:
    return "xla"
  return implementation


def attend(q, k, v, *, causal=False, kv_mask=None, implementation="xla"):
  if implementation == "xla":
    return _xla(q, k, v, causal, kv_mask)
  if implementation == "cudnn":
    # jax turns the mask into a cuDNN bias; full [B, 1, Lq, Lk], the shape cuDNN's bias takes.
    mask = None if kv_mask is None else jnp.broadcast_to(
        kv_mask[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, is_causal=causal,
                                        implementation="cudnn")
  if implementation == "splash":
    return _splash(q, k, v, causal, kv_mask)
  raise ValueError(f"unknown attention {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")


def _xla(q, k, v, causal, kv_mask):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
  mask = None
  if causal:
    mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
  if kv_mask is not None:
    m = kv_mask[:, None, None, :]
    mask = m if mask is None else mask & m
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  # Softmax in float32 whatever the compute dtype.
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _round_up(n, m):
  return -(-n // m) * m


# Built at every trace (as MaxText does), not cached: its mask tables become arrays of the trace
# that builds them, which a cache would leak into the next one.
def _splash_kernel(lq, lk, heads, causal, interpret):
  # Imported here: the TPU kernel module is only needed by runs that choose it.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (lq, lk)
  one = sm.CausalMask(shape) if causal else sm.FullMask(shape)
  block_q = max(b for b in (512, 256, 128) if lq % b == 0)
  block_kv = max(b for b in (512, 256, 128) if lk % b == 0)
  sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                        block_q_dkv=block_q, block_kv_dkv=block_kv,
                        block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                            q_seq_shards=1, interpret=interpret), sk.SegmentIds


def _splash(q, k, v, causal, kv_mask):
  b, lq, h, _ = q.shape
  lk = k.shape[1]
  if lk != lq:  # see the padding below; the MAP head's cross-attention stays on xla
    raise ValueError(f"splash attention here is self-attention only, got {lq} queries, {lk} keys")
  pq, pk = _round_up(lq, SPLASH_LANES), _round_up(lk, SPLASH_LANES)
  kernel, segment_ids = _splash_kernel(pq, pk, h, causal, jax.default_backend() != "tpu")
  # Segment 1: real queries and keys; 0: padding (masked keys and the rounding-up tail). A padded
  # query sees padded keys only, at least itself (self-attention), so no softmax row is empty
  # (an empty one would give NaN); the padded rows are cut off below.
  q_seg = jnp.broadcast_to(jnp.arange(pq) < lq, (b, pq)).astype(jnp.int32)
  real_k = jnp.arange(pk) < lk
  if kv_mask is not None:
    real_k = real_k & jnp.pad(kv_mask, ((0, 0), (0, pk - lk)))
  kv_seg = jnp.broadcast_to(real_k, (b, pk)).astype(jnp.int32)

  def heads_first(x, length):  # [B, L, H, Dh] -> [B, H, length, Dh]
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  out = jax.vmap(lambda q1, k1, v1, qs, ks: kernel(q1, k1, v1, segment_ids=segment_ids(qs, ks)))(
      heads_first(q, pq), heads_first(k, pk), heads_first(v, pk), q_seg, kv_seg)
  return out.transpose(0, 2, 1, 3)[:, :lq].astype(q.dtype)

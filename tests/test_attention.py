"""The attention implementations (`model.attention`) against a numpy loop and against `xla`.

splash runs here in Pallas interpret mode (the TPU kernel's own code, executed by XLA:CPU);
cudnn needs a GPU and is skipped without one.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxret import config
from jaxret.errors import UserError
from jaxret.experiment import Experiment, load_config
from jaxret.models.attention import IMPLEMENTATIONS, attend, check_backend
from jaxret.models.two_tower import build_model
from jaxret.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
B, L, H, DH = 2, 12, 2, 8  # L pads to splash's 128-token tiles
ON_GPU = jax.default_backend() == "gpu"
NEEDS_GPU = pytest.mark.skipif(
    not ON_GPU, reason=f"cuDNN flash attention needs a GPU; JAX's backend here is "
                       f"{jax.default_backend()}")

# (causal, kv_mask): bidirectional, causal (CLIP text), padded keys, and both.
PADDED = np.array([[True] * L, [True] * 7 + [False] * (L - 7)])
CASES = {"full": (False, None), "causal": (True, None), "padded": (False, PADDED),
         "causal_padded": (True, PADDED)}


def _qkv(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.normal(size=(B, L, H, DH)), dtype) for _ in range(3))


def _numpy_attention(q, k, v, causal, kv_mask):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros_like(q)
  for b in range(B):
    for h in range(H):
      for i in range(L):
        seen = [j for j in range(L) if (not causal or j <= i)
                and (kv_mask is None or kv_mask[b, j])]
        logits = np.array([q[b, i, h] @ k[b, j, h] for j in seen])
        w = np.exp(logits - logits.max())
        out[b, i, h] = (w / w.sum()) @ v[b, seen, h]
  return out


def _loss_and_grads(impl, causal, kv_mask, q, k, v):
  # A weighted sum, so each output element gets its own cotangent.
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  def loss(q, k, v):
    out = attend(q, k, v, causal=causal, kv_mask=kv_mask, implementation=impl)
    return jnp.sum(out.astype(jnp.float32) * weights)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("case", CASES)
def test_xla_matches_numpy_loop(case):
  causal, kv_mask = CASES[case]
  q, k, v = _qkv()
  got = attend(q, k, v, causal=causal, kv_mask=kv_mask, implementation="xla")
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, causal, kv_mask), atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_splash_matches_xla_value_and_gradient(case):
  causal, kv_mask = CASES[case]
  q, k, v = _qkv()
  out = attend(q, k, v, causal=causal, kv_mask=kv_mask, implementation="splash")
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, causal, kv_mask), atol=1e-5)
  (lx, gx), (ls, gs) = (_loss_and_grads(i, causal, kv_mask, q, k, v) for i in ("xla", "splash"))
  np.testing.assert_allclose(ls, lx, rtol=1e-5, atol=1e-5)
  for a, b in zip(gs, gx):
    np.testing.assert_allclose(a, b, atol=1e-4)


@NEEDS_GPU
@pytest.mark.parametrize("case", CASES)
def test_cudnn_matches_xla_value_and_gradient(case):
  causal, kv_mask = CASES[case]
  q, k, v = _qkv(jnp.bfloat16)  # cuDNN flash attention has fp16/bf16 kernels only
  (lx, gx), (lc, gc) = (_loss_and_grads(i, causal, kv_mask, q, k, v) for i in ("xla", "cudnn"))
  np.testing.assert_allclose(np.float32(lc), np.float32(lx), rtol=2e-2, atol=0.5)
  for a, b in zip(gc, gx):
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=5e-2, rtol=5e-2)


def _clip_loss(out):
  logits = out["scale"] * out["image_emb"] @ out["text_emb"].T
  labels = jnp.arange(logits.shape[0])
  return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() +
          optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2


@pytest.mark.parametrize("overrides", [
    [],  # CLIP: causal text, cls-pooled ViT
    ["model.text.causal=False", "model.text.pool=last", "model.image.pool=map"],  # SigLIP's form
], ids=["clip", "siglip"])
def test_model_with_splash_gives_xla_loss(overrides):
  # The loss only: gradients through the kernel are checked above, and a model's backward pass
  # through the interpreted kernel costs more time than it adds.
  tiny = ["model.embed_dim=16", "model.image.size=32", "model.image.width=16",
          "model.image.depth=1", "model.image.num_heads=2", "model.image.mlp_dim=32",
          "model.text.width=16", "model.text.depth=1", "model.text.num_heads=2",
          "model.text.mlp_dim=32", "model.text.max_len=8", "model.text.vocab_size=50"]
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(4, 32, 32, 3)).astype(np.uint8)
  text = np.array([[1, 5, 9, 2, 0, 0, 0, 0], [1, 7, 2, 0, 0, 0, 0, 0],
                   [1, 3, 4, 6, 8, 10, 11, 2], [1, 12, 13, 2, 0, 0, 0, 0]], np.int32)
  results = {}
  params = None
  for impl in ("xla", "splash"):
    cfg = config.load(f"{DEMO}:softmax", tiny + overrides + [f"model.attention={impl}"])
    model = build_model(cfg.model, vocab_size=50)
    if params is None:
      params = model.init(jax.random.key(0), image, text)["params"]
    out = jax.jit(model.apply)({"params": params}, image, text)
    results[impl] = (_clip_loss(out), out["image_emb"], out["text_emb"])
  for s, x in zip(results["splash"], results["xla"]):
    np.testing.assert_allclose(s, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl,platform,dtype,message", [
    ("cudnn", "cpu", "bfloat16", r"model.attention='cudnn' needs a GPU \(found cpu\); use 'xla'"),
    ("cudnn", "gpu", "float32", r"model.attention='cudnn' needs model.dtype='bfloat16'"),
    ("splash", "cpu", "float32", r"model.attention='splash' needs a TPU \(found cpu\); use 'xla'"),
    ("splash", "gpu", "float32", r"needs a TPU \(found gpu\); use 'xla' or cudnn"),
])
def test_backend_refusals(impl, platform, dtype, message):
  with pytest.raises(UserError, match=message):
    check_backend(impl, platform, dtype)


def test_backend_accepts_what_it_can_run():
  check_backend("xla", "cpu", "float32")
  check_backend("cudnn", "gpu", "bfloat16")
  check_backend("splash", "tpu", "float32")
  assert set(IMPLEMENTATIONS) == {"xla", "cudnn", "splash"}


def test_unknown_attention_is_refused_with_the_nearest_name():
  with pytest.raises(UserError, match="unknown model.attention 'splsh'.*splash"):
    load_config(f"{DEMO}:softmax", ["model.attention=splsh"])


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="splash runs on TPU")
def test_training_refuses_missing_attention_and_evaluation_uses_xla(tiny_config, tmp_path):
  cfg = tiny_config("softmax", "model.attention=splash")
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match=r"model.attention='splash' needs a TPU \(found "):
    train(cfg, str(workdir))
  assert not workdir.exists()  # refused before the workdir, let alone a compile
  # Evaluation and export (same Experiment, no check_attention) compute with xla instead.
  exp = Experiment(cfg)
  assert exp.attention == "xla"
  assert exp.model.text.attention == exp.model.image.attention == "xla"

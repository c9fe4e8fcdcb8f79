"""Model behaviour against independent references (numpy loops, structural properties)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret.models.layers import Attention
from jaxret.models.text import TextTransformer
from jaxret.models.two_tower import TwoTower
from jaxret.models.vit import ViT


def small_tower(pool="cls", causal=True, text_pool="eos", init_bias=None):
  return TwoTower(
      image=ViT(patch_size=16, width=32, depth=2, num_heads=4, mlp_dim=64, pool=pool),
      text=TextTransformer(vocab_size=20, max_len=8, width=32, depth=2, num_heads=4, mlp_dim=64,
                           causal=causal, pool=text_pool, eos_id=2),
      embed_dim=16, init_bias=init_bias)


TEXT = np.array([[1, 5, 6, 2, 0, 0, 0, 0],     # BOS a b EOS pad...
                 [1, 7, 8, 9, 10, 11, 12, 2],  # fills the context
                 [1, 4, 2, 0, 0, 0, 0, 0]], np.int32)
IMAGE = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)


def test_attention_matches_numpy_loop():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  mask = np.tril(np.ones((5, 5), bool))[None, None]
  attn = Attention(num_heads=2, causal=True)
  params = attn.init(jax.random.key(0), x, x)["params"]
  got = np.asarray(attn.apply({"params": params}, x, x))
  p = {k: np.asarray(nn.unbox(v)) for k, v in params.items()}
  want = np.zeros_like(x)
  for b in range(2):
    heads = []
    for h in range(2):
      q = x[b] @ p["query_kernel"][:, h] + p["query_bias"][h]
      k = x[b] @ p["key_kernel"][:, h] + p["key_bias"][h]
      v = x[b] @ p["value_kernel"][:, h] + p["value_bias"][h]
      logits = q @ k.T / math.sqrt(4)
      logits = np.where(mask[0, 0], logits, -np.inf)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      heads.append((w / w.sum(-1, keepdims=True)) @ v)
    concat = np.concatenate(heads, axis=-1)                 # [L, H*Dh]
    want[b] = concat @ p["out_kernel"].reshape(8, 8) + p["out_bias"]
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
def test_two_tower_outputs(pool):
  m = small_tower(pool=pool, init_bias=-10.0)
  v = m.init(jax.random.key(0), IMAGE, TEXT, tokens=True)
  out = m.apply(v, IMAGE, TEXT, tokens=True)
  n_img = 4 + (pool == "cls")
  assert out["image_emb"].shape == (3, 16) and out["text_emb"].shape == (3, 16)
  assert out["image_tokens"].shape == (3, n_img, 16)
  assert out["text_tokens"].shape == (3, 8, 16)
  for k in ("image_emb", "text_emb", "image_tokens", "text_tokens"):
    np.testing.assert_allclose(np.linalg.norm(out[k], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(out["text_mask"], TEXT != 0)
  assert out["image_mask"].all()
  np.testing.assert_allclose(out["scale"], 1 / 0.07, rtol=1e-6)
  np.testing.assert_allclose(out["bias"], -10.0)


def test_pooled_vector_is_the_projected_token():
  """The same projection serves pooled and token embeddings: CLIP pools the first EOS token,
  cls pooling takes token 0, SigLIP's text tower takes the last position."""
  m = small_tower()
  v = m.init(jax.random.key(0), IMAGE, TEXT, tokens=True)
  out = m.apply(v, IMAGE, TEXT, tokens=True)
  eos_pos = [3, 7, 2]
  for i, p in enumerate(eos_pos):
    np.testing.assert_allclose(out["text_emb"][i], out["text_tokens"][i, p], atol=1e-6)
  np.testing.assert_allclose(out["image_emb"], out["image_tokens"][:, 0], atol=1e-6)

  m2 = small_tower(causal=False, text_pool="last")
  v2 = m2.init(jax.random.key(0), IMAGE, TEXT, tokens=True)
  out2 = m2.apply(v2, IMAGE, TEXT, tokens=True)
  np.testing.assert_allclose(out2["text_emb"], out2["text_tokens"][:, -1], atol=1e-6)


def test_causal_text_ignores_later_tokens_bidirectional_does_not():
  changed = TEXT.copy()
  changed[:, 5] = 13  # a token after the EOS of rows 0 and 2
  for causal, should_change in ((True, False), (False, True)):
    tower = TextTransformer(vocab_size=20, max_len=8, width=32, depth=2, num_heads=4,
                            mlp_dim=64, causal=causal, pool="eos", eos_id=2)
    v = tower.init(jax.random.key(0), TEXT)
    a, _ = tower.apply(v, TEXT)
    b, _ = tower.apply(v, changed)
    same_prefix = np.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert same_prefix != should_change


def test_scale_is_capped():
  m = TwoTower(image=small_tower().image, text=small_tower().text, embed_dim=16,
               init_scale=50.0, max_scale=20.0)
  v = m.init(jax.random.key(0), IMAGE, TEXT)
  assert float(m.apply(v, IMAGE, TEXT)["scale"]) == pytest.approx(20.0)
  np.testing.assert_allclose(nn.unbox(v["params"]["t"]), math.log(50.0), rtol=1e-6)


def test_every_parameter_has_logical_axes_of_its_rank():
  m = small_tower(pool="map", init_bias=-10.0)
  boxed = jax.eval_shape(lambda: m.init(jax.random.key(0), IMAGE, TEXT))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)


def test_image_size_not_divisible_by_patch_is_refused():
  m = small_tower()
  with pytest.raises(ValueError, match="patch_size"):
    m.init(jax.random.key(0), np.zeros((1, 30, 30, 3), np.float32), TEXT[:1])


def test_model_runs_sharded_under_logical_rules():
  """Under an 8-device mesh with the logical rules, the batch stays split over devices."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxret.parallel import partitioning
  from jaxret.parallel.mesh import make_mesh
  mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  m = small_tower()
  image = np.repeat(IMAGE, 8, axis=0)[:16]
  text = np.repeat(TEXT, 8, axis=0)[:16]
  ref = m.apply(m.init(jax.random.key(0), image, text), image, text)
  boxed = jax.eval_shape(lambda: m.init(jax.random.key(0), image, text))
  sh = partitioning.logical_shardings(boxed, mesh)
  with partitioning.activate(mesh):
    v = jax.jit(lambda r: nn.unbox(m.init(r, image, text)), out_shardings=sh)(jax.random.key(0))
    bs = NamedSharding(mesh, P(("data", "fsdp")))
    out = jax.jit(lambda v, i, t: m.apply(v, i, t))(
        v, jax.device_put(image, bs), jax.device_put(text, bs))
  assert out["image_emb"].sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(out["image_emb"], ref["image_emb"], atol=1e-5)
  np.testing.assert_allclose(out["text_emb"], ref["text_emb"], atol=1e-5)


def test_uint8_pixels_are_normalised_with_the_configured_statistics():
  mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
  vit = ViT(patch_size=16, width=32, depth=1, num_heads=4, mlp_dim=64, mean=mean, std=std)
  pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  params = vit.init(jax.random.key(0), IMAGE[:2])
  by_hand = (pixels / 255.0 - np.array(mean)) / np.array(std)  # float64 reference
  want = vit.apply(params, jnp.asarray(by_hand, jnp.float32))
  got = vit.apply(params, jnp.asarray(pixels))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_exact_gelu_matches_the_erf_formula_and_its_derivative():
  from jaxret.models.layers import ACTIVATIONS
  x = np.linspace(-8, 8, 1001)
  want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
  gelu = ACTIVATIONS["gelu"]
  np.testing.assert_allclose(gelu(jnp.asarray(x, jnp.float32)), want, atol=2e-6)
  # d/dx = Phi(x) + x phi(x)
  dwant = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2)
                    / math.sqrt(2 * math.pi) for v in x])
  np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(jnp.asarray(x, jnp.float32)), dwant,
                             atol=2e-6)

"""Losses: kernels match references (value and gradient, 1 and 8 devices); references
match plain-Python loops and values worked out by hand."""

import jax

try:
  jax.config.update("jax_num_cpu_devices", 8)  # before any JAX op; the mesh tests need 8 CPUs
except RuntimeError:
  pass  # backend already up (conftest or an earlier module); mesh tests skip if it has < 8

import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import losses
from jaxret.errors import UserError

B, D = 16, 8  # global batch: 2 rows per device on 8 devices, so row offsets matter
NI, NT = 5, 6  # FILIP image / text tokens
SCALE, BIAS = 10.0, -3.0
TOL = dict(rtol=1e-5, atol=1e-5)

MESHES = {  # (data, fsdp, tensor) -> batch axes
    "1dev": ((1, 1, 1), ("data", "fsdp")),
    "data8": ((8, 1, 1), ("data", "fsdp")),
    "data4xfsdp2": ((4, 2, 1), ("data", "fsdp")),
    "data2xfsdp2xtensor2": ((2, 2, 2), ("data", "fsdp")),  # replicated over 'tensor'
    "data8_str_axis": ((8, 1, 1), "data"),
}


@pytest.fixture(autouse=True)
def _exact_matmuls():
  # fp32 everywhere (no TF32/bf16 passes on accelerators) so 1e-5 is meaningful.
  with jax.default_matmul_precision("highest"):
    yield


@functools.cache
def _mesh(shape):
  n = math.prod(shape)
  if len(jax.devices()) < n:
    pytest.skip(f"needs {n} devices, have {len(jax.devices())}; set XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:n])


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _pooled(batch=B, seed=0):
  rng = np.random.default_rng(seed)
  images = _unit(rng.normal(size=(batch, D)))
  texts = _unit(images + 0.7 * rng.normal(size=(batch, D)))  # correlated, so the loss is not flat
  return images, texts


def _tokens(batch=B, seed=1, garbage=3.0):
  """Unit tokens with ragged text lengths (one text of a single token) and partly masked images.

  Padding positions hold large random values, so any leak through the mask shows.
  """
  rng = np.random.default_rng(seed)
  image_tokens = _unit(rng.normal(size=(batch, NI, D)))
  text_tokens = _unit(image_tokens[:, :1] + rng.normal(size=(batch, NT, D)))
  text_len = rng.integers(1, NT + 1, size=batch)
  text_len[0], text_len[1] = 1, NT
  image_len = np.full(batch, NI)
  image_len[2], image_len[batch - 1] = 2, NI - 1
  image_mask = np.arange(NI)[None] < image_len[:, None]
  text_mask = (np.arange(NT)[None] < text_len[:, None]).astype(np.int32)  # 0/1 masks work too
  image_tokens[~image_mask] = garbage * rng.normal(size=(int((~image_mask).sum()), D))
  text_tokens[text_mask == 0] = garbage * rng.normal(size=(int((text_mask == 0).sum()), D))
  return image_tokens, image_mask, text_tokens, text_mask


# Arguments to differentiate for each loss (masks are not differentiable).
_GRAD_ARGS = {"softmax": (0, 1, 2), "sigmoid": (0, 1, 2, 3), "filip": (0, 2, 4)}
_KERNELS = {"softmax": losses.softmax_loss, "sigmoid": losses.sigmoid_loss, "filip": losses.filip_loss}
_REFERENCES = {"softmax": losses.softmax_reference, "sigmoid": losses.sigmoid_reference,
               "filip": losses.filip_reference}


def _args(name):
  if name == "softmax":
    return (*_pooled(), np.float32(SCALE))
  if name == "sigmoid":
    return (*_pooled(), np.float32(SCALE), np.float32(BIAS))
  return (*_tokens(), np.float32(SCALE))


@functools.cache
def _reference_vg(name):
  return jax.jit(jax.value_and_grad(_REFERENCES[name], argnums=_GRAD_ARGS[name]))


@functools.cache
def _kernel_vg(name, mesh_name):
  shape, axes = MESHES[mesh_name]
  mesh = _mesh(shape)
  fn = functools.partial(_KERNELS[name], mesh=mesh, axes=axes)
  return jax.jit(jax.value_and_grad(fn, argnums=_GRAD_ARGS[name]))


def _close(actual, expected, **tol):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **(tol or TOL))


# ----------------------------------------------------------------------------------------
# Kernels against references.


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", ["softmax", "sigmoid", "filip"])
def test_kernel_matches_reference(name, mesh_name):
  args = _args(name)
  want_loss, want_grads = _reference_vg(name)(*args)
  loss, grads = _kernel_vg(name, mesh_name)(*args)
  assert loss.shape == ()
  _close(loss, want_loss)
  for got, want in zip(grads, want_grads):
    _close(got, want)


def test_filip_kernel_ignores_padding_and_gives_it_no_gradient():
  args = (*_tokens(garbage=1e3), np.float32(SCALE))
  clean = (*_tokens(garbage=0.0), np.float32(SCALE))
  kernel = _kernel_vg("filip", "data4xfsdp2")
  (loss, (d_images, d_texts, _)), (clean_loss, _) = kernel(*args), kernel(*clean)
  _close(loss, clean_loss)
  assert np.all(np.asarray(d_images)[~args[1]] == 0)
  assert np.all(np.asarray(d_texts)[args[3] == 0] == 0)


# ----------------------------------------------------------------------------------------
# References against plain-Python loops (float64, valid tokens only) on a tiny batch.


def _np_info_nce(logits):
  """Mean cross-entropy of rows of `logits` (list of lists) with the diagonal as labels."""
  n = len(logits)
  return sum(math.log(sum(math.exp(v) for v in row)) - row[i] for i, row in enumerate(logits)) / n


def _np_softmax(x, y, s):
  n = len(x)
  logits = [[s * float(np.dot(x[i], y[j])) for j in range(n)] for i in range(n)]
  transposed = [[logits[i][j] for i in range(n)] for j in range(n)]
  return (_np_info_nce(logits) + _np_info_nce(transposed)) / 2


def _np_sigmoid(x, y, s, b):
  n = len(x)
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      total += math.log1p(math.exp(-z * (s * float(np.dot(x[i], y[j])) + b)))  # -log sigmoid
  return total / n


def _np_filip_scores(images, texts):
  """images/texts: lists of [n_valid, d] arrays. Returns s^I, s^T as [image][text] lists."""
  s_i = [[np.mean([max(float(v @ t) for t in T) for v in V]) for T in texts] for V in images]
  s_t = [[np.mean([max(float(v @ t) for v in V) for t in T]) for T in texts] for V in images]
  return s_i, s_t


def _np_filip(images, texts, s):
  s_i, s_t = _np_filip_scores(images, texts)
  n = len(images)
  image_rows = [[s * s_i[i][j] for j in range(n)] for i in range(n)]
  text_rows = [[s * s_t[i][j] for i in range(n)] for j in range(n)]
  return (_np_info_nce(image_rows) + _np_info_nce(text_rows)) / 2


def _valid(tokens, mask):
  return [t[np.asarray(m).astype(bool)].astype(np.float64) for t, m in zip(tokens, mask)]


def test_softmax_reference_matches_loop():
  x, y = _pooled(batch=3, seed=5)
  for s in (0.5, 10.0):
    _close(losses.softmax_reference(x, y, s), _np_softmax(x, y, s))


def test_sigmoid_reference_matches_loop():
  x, y = _pooled(batch=3, seed=6)
  for s, b in ((1.0, 0.0), (10.0, -10.0), (5.0, 2.0)):
    _close(losses.sigmoid_reference(x, y, s, b), _np_sigmoid(x, y, s, b))


def test_filip_reference_and_scores_match_loop():
  it, im, tt, tm = _tokens(batch=4, seed=7)  # ragged texts incl. a 1-token one; masked images
  images, texts = _valid(it, im), _valid(tt, tm)
  _close(losses.filip_reference(it, im, tt, tm, 4.0), _np_filip(images, texts, 4.0))
  # Scores with more texts than images pin the [image, text] layout of both outputs.
  s_i, s_t = losses.filip_scores(it[:3], im[:3], tt, tm)
  want_i, want_t = _np_filip_scores(images[:3], texts)
  assert s_i.shape == s_t.shape == (3, 4)
  _close(s_i, want_i)
  _close(s_t, want_t)


# ----------------------------------------------------------------------------------------
# Values worked out by hand.


def test_softmax_known_values():
  eye = np.eye(B, D * 2, dtype=np.float32)  # orthonormal, perfectly matched pairs
  x, y = _pooled()
  assert float(losses.softmax_reference(x, y, 0.0)) == pytest.approx(math.log(B), abs=1e-6)  # uniform
  assert float(losses.softmax_reference(eye, eye, 100.0)) < 1e-6
  # Logits s on the diagonal, 0 elsewhere: each row's CE is log(1 + (B-1) e^-s).
  _close(losses.softmax_reference(eye, eye, 2.0), math.log1p((B - 1) * math.exp(-2.0)))
  kernel = _kernel_vg("softmax", "data4xfsdp2")
  _close(kernel(x, y, np.float32(0.0))[0], math.log(B))


def test_sigmoid_known_values():
  x, y = _pooled()
  # Every one of the B*B logits is 0: B*B * log 2, divided by B.
  _close(losses.sigmoid_reference(x, y, 0.0, 0.0), B * math.log(2))
  _close(_kernel_vg("sigmoid", "data4xfsdp2")(x, y, np.float32(0), np.float32(0))[0], B * math.log(2))
  # Orthonormal matched pairs: B positives at s+b, B(B-1) negatives at b.
  eye = np.eye(B, D * 2, dtype=np.float32)
  s, b = 10.0, -10.0
  want = (-B * math.log(1 / (1 + math.exp(-(s + b)))) - B * (B - 1) * math.log(1 / (1 + math.exp(b)))) / B
  _close(losses.sigmoid_reference(eye, eye, s, b), want)


def test_filip_known_values():
  # One image token e1 against a text with tokens e1, e2: the image token finds e1 (s^I = 1),
  # but only one of the two text tokens finds a match (s^T = (1 + 0) / 2).
  e = np.eye(2, dtype=np.float32)
  s_i, s_t = losses.filip_scores(e[None, :1], np.ones((1, 1)), e[None], np.ones((1, 2)))
  _close(s_i, [[1.0]])
  _close(s_t, [[0.5]])
  # Every valid token of pair i is the same basis vector e_i: scores are the identity, so the
  # loss is the softmax closed form, whatever sits in the padding.
  _, im, _, tm = _tokens()
  rng = np.random.default_rng(2)
  it = np.broadcast_to(np.eye(B, dtype=np.float32)[:, None, :], (B, NI, B)).copy()
  tt = np.broadcast_to(np.eye(B, dtype=np.float32)[:, None, :], (B, NT, B)).copy()
  it[~im] = 1e3 * rng.normal(size=(int((~im).sum()), B))
  tt[tm == 0] = 1e3 * rng.normal(size=(int((tm == 0).sum()), B))
  _close(losses.filip_reference(it, im, tt, tm, 2.0), math.log1p((B - 1) * math.exp(-2.0)))


def test_filip_reference_ignores_huge_padding():
  quiet, loud = _tokens(garbage=0.0), _tokens(garbage=1e4)
  _close(losses.filip_reference(*loud, SCALE), losses.filip_reference(*quiet, SCALE))
  # And the mask matters: treating padding as real tokens changes the loss.
  it, im, tt, tm = loud
  assert not np.isclose(losses.filip_reference(it, np.ones_like(im), tt, np.ones_like(tm), SCALE),
                        losses.filip_reference(*loud, SCALE))


# ----------------------------------------------------------------------------------------
# Registry and user errors.


def test_registry():
  assert losses.LOSS_NAMES == ("filip", "sigmoid", "softmax", "triplet")
  softmax, sigmoid, filip = (losses.get_loss(n) for n in ("softmax", "sigmoid", "filip"))
  assert (softmax.needs_tokens, softmax.uses_bias, softmax.similarity) == (False, False, "pooled")
  assert (sigmoid.needs_tokens, sigmoid.uses_bias, sigmoid.similarity) == (False, True, "pooled")
  assert (filip.needs_tokens, filip.uses_bias, filip.similarity) == (True, False, "late_interaction")


def test_unknown_loss_names_nearest():
  with pytest.raises(UserError) as err:
    losses.get_loss("sigmod")
  assert str(err.value) == "unknown loss 'sigmod' (did you mean 'sigmoid'?); valid: filip, sigmoid, softmax, triplet"
  for bad in ("clip_softmax", "Softmax", "", None):  # no substring or case folding
    with pytest.raises(UserError):
      losses.get_loss(bad)


def test_registry_fn_reads_model_outputs():
  mesh = _mesh((4, 2, 1))
  x, y = _pooled()
  it, im, tt, tm = _tokens()
  outputs = dict(image_emb=x, text_emb=y, image_tokens=it, image_mask=im, text_tokens=tt,
                 text_mask=tm, scale=np.float32(SCALE), bias=np.float32(BIAS))
  for name in losses.LOSS_NAMES:
    # triplet: VSE++ on cosines at its default margin and form (no scale)
    want = (losses.triplet_reference(x, y, 0.2, True) if name == "triplet"
            else _REFERENCES[name](*_args(name)))
    fn = functools.partial(losses.get_loss(name).fn, mesh=mesh, axes=("data", "fsdp"),
                           options=dict(filip_token_fraction=1.0))  # every token, as the reference
    _close(jax.jit(fn)(outputs), want)
  del outputs["text_tokens"]
  with pytest.raises(UserError, match="loss 'filip' needs model outputs text_tokens"):
    losses.get_loss("filip").fn(outputs, mesh=mesh, axes=("data", "fsdp"))


def test_kernel_user_errors():
  mesh = _mesh((4, 2, 1))
  x, y = _pooled()
  with pytest.raises(UserError, match=r"'fdsp' is not a mesh axis \(did you mean 'fsdp'\?\)"):
    losses.softmax_loss(x, y, 1.0, mesh=mesh, axes=("data", "fdsp"))
  with pytest.raises(UserError, match="global batch 12 does not split over the 8 devices"):
    losses.softmax_loss(x[:12], y[:12], 1.0, mesh=mesh)
  with pytest.raises(UserError, match="disagree on the batch size"):
    losses.sigmoid_loss(x, y[:8], 1.0, 0.0, mesh=mesh)

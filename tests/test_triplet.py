"""loss.name=triplet (VSE++): the reference against plain loops, the sharded kernels (all_gather
and ring) against the reference on 1 and 8 simulated devices, value and gradient; the options'
one-line errors, at start of `jaxret train` too."""

import functools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from jaxret import config, losses
from jaxret.errors import UserError
from jaxret.experiment import check_components, load_config
from jaxret.losses import common, registry

import test_losses as base  # meshes (skip below 8 devices), correlated unit embeddings, tolerances

MESHES = {"1dev": (1, 1, 1), "data8": (8, 1, 1), "data4xfsdp2": (4, 2, 1)}  # (data, fsdp, tensor)
AXES = ("data", "fsdp")
MARGIN = 0.2


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _reference_vg(margin, max_violation):
  fn = functools.partial(losses.triplet_reference, margin=margin, max_violation=max_violation)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))


@functools.cache
def _kernel_vg(mesh_shape, margin, max_violation, impl, moves="auto"):
  fn = functools.partial(losses.triplet_loss, mesh=base._mesh(mesh_shape), axes=AXES, margin=margin,
                         max_violation=max_violation, impl=impl, moves=moves)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))


def _check(got, want):
  (loss, grads), (want_loss, want_grads) = got, want
  assert loss.shape == ()
  base._close(loss, want_loss)
  for g, w in zip(grads, want_grads):
    base._close(g, w)


# ----------------------------------------------------------------------------------------
# The reference against independent implementations.


def _np_triplet(x, y, margin, max_violation):
  """float64, explicit loops over positive pairs and their negatives."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  n = len(x)
  total = 0.0
  for i in range(n):
    pos = float(x[i] @ y[i])
    to_texts = [max(0.0, margin - pos + float(x[i] @ y[j])) for j in range(n) if j != i]
    to_images = [max(0.0, margin - pos + float(x[j] @ y[i])) for j in range(n) if j != i]
    reduce = max if max_violation else sum
    total += reduce(to_texts) + reduce(to_images)
  return total / n


def _loop_jnp(x, y, margin, max_violation):
  """The same loops in jnp, negatives only (no masking), for a second autodiff gradient."""
  n = x.shape[0]
  total = 0.0
  for i in range(n):
    pos = jnp.dot(x[i], y[i])
    others = [j for j in range(n) if j != i]
    to_texts = jnp.stack([jax.nn.relu(margin - pos + jnp.dot(x[i], y[j])) for j in others])
    to_images = jnp.stack([jax.nn.relu(margin - pos + jnp.dot(x[j], y[i])) for j in others])
    reduce = jnp.max if max_violation else jnp.sum
    total = total + reduce(to_texts) + reduce(to_images)
  return total / n


@pytest.mark.parametrize("max_violation", [True, False])
def test_reference_matches_loops(max_violation):
  x, y = base._pooled(batch=6, seed=3)
  for margin in (0.05, MARGIN, 1.0):
    base._close(losses.triplet_reference(x, y, margin, max_violation),
                _np_triplet(x, y, margin, max_violation))
  # Some hinges are active and some not, so the clamp is exercised.
  scores = x @ y.T
  hinges = MARGIN - np.diag(scores)[:, None] + scores
  assert (hinges[~np.eye(6, dtype=bool)] > 0).any() and (hinges[~np.eye(6, dtype=bool)] < 0).any()
  loop = functools.partial(_loop_jnp, margin=MARGIN, max_violation=max_violation)
  loop_vg = jax.value_and_grad(loop, argnums=(0, 1))
  _check(_reference_vg(MARGIN, max_violation)(x, y), loop_vg(x, y))


def test_reference_known_values():
  # Orthonormal matched pairs: positives score 1, negatives 0, so each hinge is
  # max(0, margin - 1): none below margin 1; at 1.5 each of the B - 1 negatives costs 0.5.
  eye = np.eye(base.B, dtype=np.float32)
  assert float(losses.triplet_reference(eye, eye, MARGIN, True)) == 0.0
  base._close(losses.triplet_reference(eye, eye, 1.5, False), 2 * (base.B - 1) * 0.5)
  base._close(losses.triplet_reference(eye, eye, 1.5, True), 2 * 0.5)


# ----------------------------------------------------------------------------------------
# Kernels against the reference.


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("impl", ["all_gather", "ring"])
@pytest.mark.parametrize("max_violation", [True, False])
def test_kernel_matches_reference(max_violation, impl, mesh_name):
  x, y = base._pooled()
  _check(_kernel_vg(MESHES[mesh_name], MARGIN, max_violation, impl)(x, y),
         _reference_vg(MARGIN, max_violation)(x, y))


# An odd ring (ppermute, 3 devices), pair swaps and ppermute on 8, and blocks too large to pack.
@pytest.mark.parametrize("shape,moves,large", [((3, 1, 1), "swaps", False),
                                               ((4, 2, 1), "ppermute", False),
                                               ((4, 2, 1), "swaps", True)])
@pytest.mark.parametrize("max_violation", [True, False])
def test_ring_forms_match_reference(max_violation, shape, moves, large, monkeypatch):
  if large:
    monkeypatch.setattr(common, "SMALL_BLOCK_BYTES", 0)
  x, y = base._pooled(batch=12 if shape[0] == 3 else 16, seed=4)
  fn = functools.partial(losses.triplet_loss, mesh=base._mesh(shape), axes=AXES, margin=MARGIN,
                         max_violation=max_violation, impl="ring", moves=moves)
  _check(jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(x, y),
         _reference_vg(MARGIN, max_violation)(x, y))


def _first_hardest_grads(x, y, margin):
  """numpy: the max-violation gradient when equal hardest negatives give it to the first."""
  n = len(x)
  scores = x @ y.T
  pos = np.diag(scores)
  rows = np.where(np.eye(n, dtype=bool), 0.0, np.maximum(0.0, margin - pos[:, None] + scores))
  cols = np.where(np.eye(n, dtype=bool), 0.0, np.maximum(0.0, margin - pos[None, :] + scores))
  dx, dy = np.zeros_like(x), np.zeros_like(y)
  for i in range(n):
    j = int(np.argmax(rows[i]))  # image i's hardest text
    if rows[i, j] > 0:
      dx[i] += y[j] - y[i]
      dy[j] += x[i]
      dy[i] -= x[i]
    k = int(np.argmax(cols[:, i]))  # text i's hardest image
    if cols[k, i] > 0:
      dy[i] += x[k] - x[i]
      dx[k] += y[i]
      dx[i] -= y[i]
  return dx / n, dy / n


@pytest.mark.parametrize("impl,mesh_name", [("all_gather", "1dev"), ("all_gather", "data4xfsdp2"),
                                            ("ring", "1dev"), ("ring", "data8")])
def test_equal_hardest_negatives_give_the_gradient_to_the_first(impl, mesh_name):
  # Basis vectors score exactly 0 or 1 whatever the matmul order, so ties are exact. Texts 3
  # and 5 repeat text 0: image 0 has two hardest negatives; image 3 (its text now e_0) has 15.
  x = np.eye(base.B, dtype=np.float32)
  y = x.copy()
  y[3] = y[5] = x[0]
  loss, (dx, dy) = _kernel_vg(MESHES[mesh_name], MARGIN, True, impl)(x, y)
  base._close(loss, losses.triplet_reference(x, y, MARGIN, True))
  want_dx, want_dy = _first_hardest_grads(x, y, MARGIN)
  base._close(dx, want_dx)
  base._close(dy, want_dy)
  _, (ref_dx, _) = _reference_vg(MARGIN, True)(x, y)
  assert not np.allclose(ref_dx, want_dx)  # jnp.max splits ties: the data has them


# ----------------------------------------------------------------------------------------
# Registry, config and user errors.


def _outputs():
  x, y = base._pooled()
  return dict(image_emb=x, text_emb=y, scale=np.float32(base.SCALE), bias=np.float32(base.BIAS))


def test_registry_reads_pooled_outputs_and_ignores_the_scale():
  loss = losses.get_loss("triplet", dict(name="triplet", impl="ring", triplet_margin=0.5,
                                         triplet_max_violation=False))
  assert (loss.needs_tokens, loss.uses_bias, loss.similarity) == (False, False, "pooled")
  fn = functools.partial(loss.fn, mesh=base._mesh((4, 2, 1)), axes=AXES, options=loss.options)
  out = _outputs()
  want = losses.triplet_reference(out["image_emb"], out["text_emb"], 0.5, False)
  base._close(jax.jit(fn)(out), want)
  # VSE++ scores raw cosines: the learnt temperature gets no gradient.
  d_scale = jax.grad(lambda s: fn({**out, "scale": s}))(jnp.float32(base.SCALE))
  assert float(d_scale) == 0.0
  defaults = losses.get_loss("triplet").options
  assert (defaults["triplet_margin"], defaults["triplet_max_violation"]) == (0.2, True)


def test_demo_variant_is_the_softmax_demo_with_the_triplet_loss():
  triplet = load_config(f"{ROOT}/configs/demo.py:triplet")
  softmax = load_config(f"{ROOT}/configs/demo.py:softmax")
  assert triplet.loss.name == "triplet"
  assert triplet.model.to_dict() == softmax.model.to_dict()  # CLIP-style towers
  assert triplet.optim.to_dict() == softmax.optim.to_dict()
  assert triplet.loss.triplet_max_violation is False  # the form that learns from scratch


MARGIN_ERROR = "loss.triplet_margin must be > 0 (VSE++ uses 0.2), got "


@pytest.mark.parametrize("key,value,prefix", [
    ("triplet_margin", 0.0, MARGIN_ERROR),
    ("triplet_margin", -1, MARGIN_ERROR),
    ("triplet_margin", math.inf, MARGIN_ERROR),
    ("triplet_margin", math.nan, MARGIN_ERROR),
    ("triplet_margin", "0.2", MARGIN_ERROR),
    ("triplet_margin", True, MARGIN_ERROR),
    ("triplet_max_violation", "yes", "loss.triplet_max_violation must be true or false, got "),
])
def test_bad_options_are_one_line_user_errors(key, value, prefix):
  with pytest.raises(UserError) as err:
    registry.check_options({"name": "triplet", key: value})
  assert str(err.value) == prefix + repr(value)
  if isinstance(value, (str, bool)):
    return  # in a config a string fails its type check first, and True becomes 1.0
  cfg = config.merge({"loss": {"name": "triplet", key: value}})  # the config stores a float
  with pytest.raises(UserError) as err:
    check_components(cfg)
  assert str(err.value) == prefix + repr(float(value))


def test_train_refuses_a_margin_of_zero_at_start(tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.run([sys.executable, "-m", "jaxret.cli", "train", "--config",
                         "configs/demo.py:softmax", "--workdir", str(workdir),
                         "--config.loss.name=triplet", "--config.loss.triplet_margin=0"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "jaxret: error: " + MARGIN_ERROR + "0.0"], proc.stderr[-2000:]
  assert not workdir.exists()  # refused before the run started

"""Loss kernel variants (ring forms, FILIP tiling, token selection, half-precision wire,
special tokens) held to the naive references, value and gradient, on 1, 2, 4 and 8
simulated devices; and the loss options as the config sees them."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import config, losses
from jaxret.errors import UserError
from jaxret.experiment import check_components
from jaxret.losses import common, filip, registry

import test_losses as base  # shared data makers, meshes and tolerances

MESHES = {  # name -> ((data, fsdp, tensor), batch axes)
    "1dev": ((1, 1, 1), ("data", "fsdp")),
    "data2": ((2, 1, 1), ("data", "fsdp")),
    "data2xfsdp2": ((2, 2, 1), ("data", "fsdp")),
    "data4xfsdp2": ((4, 2, 1), ("data", "fsdp")),
    "data2xfsdp2xtensor2": ((2, 2, 2), ("data", "fsdp")),
}
DEVICES = {name: math.prod(shape) // shape[2] for name, (shape, _) in MESHES.items()}


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


@functools.cache
def _kernel_vg(name, mesh_name, **options):
  shape, axes = MESHES[mesh_name]
  fn = functools.partial(base._KERNELS[name], mesh=base._mesh(shape), axes=axes, **options)
  return jax.jit(jax.value_and_grad(fn, argnums=base._GRAD_ARGS[name]))


def _check(got, want):
  (loss, grads), (want_loss, want_grads) = got, want
  base._close(loss, want_loss)
  for g, w in zip(grads, want_grads):
    base._close(g, w)


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", ["softmax", "sigmoid", "filip"])
def test_ring_matches_reference(name, mesh_name):
  args = base._args(name)
  options = dict(impl="ring")
  if name == "filip":  # tiles of 1 x 1 up to 3 x 3 examples (3 does not divide b: 2 is used)
    options["chunk"] = 1 if DEVICES[mesh_name] >= 4 else 3
  _check(_kernel_vg(name, mesh_name, **options)(*args), base._reference_vg(name)(*args))


# Packed small blocks by pair swaps (on even rings; an odd ring always uses ppermute), the same
# by ppermute (loss.ring_moves), and large blocks as they are.
RING_FORMS = [(shape, form) for shape in [(3, 1, 1), (3, 2, 1), (4, 2, 1)]
              for form in ("swaps", "large")] + [((4, 2, 1), "ppermute")]


@pytest.mark.parametrize("shape,form", RING_FORMS)
@pytest.mark.parametrize("name", ["softmax", "sigmoid", "filip"])
def test_ring_of_any_size_matches_reference(name, shape, form, monkeypatch):
  if form == "large":
    monkeypatch.setattr(common, "SMALL_BLOCK_BYTES", 0)
  batch = 12 if shape[0] == 3 else 16
  if name == "filip":
    args = (*base._tokens(batch), np.float32(base.SCALE))
  else:
    args = (*base._pooled(batch), np.float32(base.SCALE)) + (
        (np.float32(base.BIAS),) if name == "sigmoid" else ())
  fn = functools.partial(base._KERNELS[name], mesh=base._mesh(shape), axes=("data", "fsdp"),
                         impl="ring", moves="ppermute" if form == "ppermute" else "swaps")
  got = jax.jit(jax.value_and_grad(fn, argnums=base._GRAD_ARGS[name]))(*args)
  _check(got, base._reference_vg(name)(*args))


def test_ring_moves_follow_the_option_and_the_backend_table():
  block = jnp.zeros((4, 8), jnp.float32)
  assert common.Ring(("data",), 4, block, "swaps").swaps
  assert not common.Ring(("data",), 4, block, "ppermute").swaps
  assert not common.Ring(("data",), 3, block, "swaps").swaps  # odd ring: no pairing
  assert common.Ring(("data",), 4, block, "auto").swaps == (common.RING_MOVES["cpu"] == "swaps")
  assert common.ring_moves("auto", "gpu") == common.RING_MOVES["gpu"]
  assert common.ring_moves("auto", "an-unknown-backend") == "ppermute"  # every backend has it


@pytest.mark.parametrize("mesh_name", ["1dev", "data2", "data2xfsdp2"])
def test_filip_all_gather_tiled_matches_reference(mesh_name):
  args = base._args("filip")
  _check(_kernel_vg("filip", mesh_name, chunk=3)(*args), base._reference_vg("filip")(*args))


# ----------------------------------------------------------------------------------------
# Half-precision wire: texts are rounded, gradients are not.


def _bf16(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("impl,mesh_name", [("ring", "data4xfsdp2"), ("all_gather", "data2xfsdp2"),
                                            ("ring", "1dev")])
def test_filip_bfloat16_wire_is_the_reference_on_rounded_texts(impl, mesh_name):
  it, im, tt, tm = base._tokens()
  want = base._reference_vg("filip")(it, im, _bf16(tt), tm, np.float32(base.SCALE))
  got = _kernel_vg("filip", mesh_name, impl=impl, comm_dtype=jnp.bfloat16)(it, im, tt, tm,
                                                                            np.float32(base.SCALE))
  _check(got, want)
  assert not np.allclose(_bf16(tt), tt)  # the rounding is real, so the test can tell


# ----------------------------------------------------------------------------------------
# Token selection, against an independent numpy selection (float64, explicit loops).


def _np_select(tokens, mask, other, other_mask, fraction):
  """Per example: indices of the kept tokens, best first, padding only after every valid token."""
  keep = max(1, math.ceil(fraction * tokens.shape[1]))
  valid_other = np.concatenate([o[m.astype(bool)] for o, m in zip(other, other_mask)]).astype(np.float64)
  out = []
  for toks, m in zip(tokens.astype(np.float64), mask.astype(bool)):
    score = [max(valid_other @ t) if m[k] else -np.inf for k, t in enumerate(toks)]
    order = sorted(range(len(toks)), key=lambda k: (-score[k], k))
    out.append(order[:keep])
  return np.array(out)


def _np_selected_indices(args, devices, fraction):
  """Selection made shard by shard, each against its own local batch, as the kernel does."""
  it, im, tt, tm = args
  b = len(it) // devices
  image_idx, text_idx = [], []
  for s in range(devices):
    rows = slice(s * b, (s + 1) * b)
    image_idx.append(_np_select(it[rows], im[rows], tt[rows], tm[rows], fraction))
    text_idx.append(_np_select(tt[rows], tm[rows], it[rows], im[rows], fraction))
  return np.concatenate(image_idx), np.concatenate(text_idx)


def _valid_sets(idx, mask):
  return [set(int(k) for k in row if m[k]) for row, m in zip(idx, np.asarray(mask).astype(bool))]


def test_select_tokens_matches_numpy():
  it, im, tt, tm = base._tokens()
  for fraction in (0.25, 0.5, 0.8):
    for chunk in (0, 3):
      want_i, want_t = _np_selected_indices((it, im, tt, tm), 1, fraction)
      best_i, best_t = filip.token_criterion(jnp.asarray(it), jnp.asarray(im),
                                             jnp.asarray(tt), jnp.asarray(tm).astype(bool), chunk)
      got_i = np.asarray(jax.lax.top_k(jnp.where(im, best_i, -jnp.inf), want_i.shape[1])[1])
      got_t = np.asarray(jax.lax.top_k(jnp.where(tm.astype(bool), best_t, -jnp.inf),
                                       want_t.shape[1])[1])
      assert _valid_sets(got_i, im) == _valid_sets(want_i, im)
      assert _valid_sets(got_t, tm) == _valid_sets(want_t, tm)
      # select_tokens returns exactly those tokens (in criterion order) and their masks.
      si, sim_, st, stm = filip.select_tokens(it, jnp.asarray(im), tt, jnp.asarray(tm).astype(bool),
                                              fraction, chunk)
      np.testing.assert_array_equal(np.asarray(si), np.take_along_axis(it, got_i[:, :, None], 1))
      np.testing.assert_array_equal(np.asarray(stm), np.take_along_axis(tm, got_t, 1).astype(bool))


def _selected_reference(idx_i, idx_t):
  def ref(it, im, tt, tm, scale):
    take = lambda x, idx: jnp.take_along_axis(x, jnp.asarray(idx).reshape(idx.shape + (1,) * (x.ndim - 2)), 1)
    return losses.filip_reference(take(it, idx_i), take(im, idx_i), take(tt, idx_t), take(tm, idx_t), scale)
  return jax.value_and_grad(ref, argnums=(0, 2, 4))


@pytest.mark.parametrize("impl,mesh_name", [("ring", "1dev"), ("ring", "data2"),
                                            ("all_gather", "data2xfsdp2"), ("ring", "data4xfsdp2"),
                                            ("all_gather", "data4xfsdp2")])
def test_filip_token_selection_matches_reference_on_numpy_selection(impl, mesh_name):
  fraction = 0.5
  it, im, tt, tm = base._tokens()
  idx_i, idx_t = _np_selected_indices((it, im, tt, tm), DEVICES[mesh_name], fraction)
  want = _selected_reference(idx_i, idx_t)(it, im, tt, tm, np.float32(base.SCALE))
  got = _kernel_vg("filip", mesh_name, impl=impl, token_fraction=fraction, chunk=2)(
      it, im, tt, tm, np.float32(base.SCALE))
  _check(got, want)
  assert not np.isclose(float(got[0]), float(base._reference_vg("filip")(it, im, tt, tm, base.SCALE)[0]))


# ----------------------------------------------------------------------------------------
# Special tokens, options and the registry path.


def test_drop_special_keeps_rows_that_would_be_empty():
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  special = np.array([[0, 0, 1, 0], [1, 0, 0, 0]], bool)
  np.testing.assert_array_equal(filip.drop_special(mask, special), [[1, 1, 0, 0], [1, 0, 0, 0]])


def _outputs():
  x, y = base._pooled()
  it, im, tt, tm = base._tokens()
  image_special = np.zeros_like(im)
  image_special[:, 0] = True  # a cls token
  text_special = np.zeros(tm.shape, bool)
  text_special[np.arange(len(tm)), np.asarray(tm).sum(1) - 1] = True  # the end token
  return dict(image_emb=x, text_emb=y, image_tokens=it, image_mask=im, text_tokens=tt, text_mask=tm,
              image_special=image_special, text_special=text_special,
              scale=np.float32(base.SCALE), bias=np.float32(base.BIAS))


def test_registry_options_reach_the_kernels():
  mesh = base._mesh((4, 2, 1))
  out = _outputs()
  for name in ("softmax", "sigmoid"):
    loss = losses.get_loss(name, dict(name=name, impl="ring"))
    fn = functools.partial(loss.fn, mesh=mesh, axes=("data", "fsdp"), options=loss.options)
    base._close(jax.jit(fn)(out), base._REFERENCES[name](*base._args(name)))
  # FILIP without special tokens: the reference on masks that leave them out (a one-token
  # caption keeps its only token).
  loss = losses.get_loss("filip", dict(impl="ring", filip_token_fraction=1.0, filip_special_tokens=False))
  got = jax.jit(functools.partial(loss.fn, mesh=mesh, axes=("data", "fsdp"), options=loss.options))(out)
  im = filip.drop_special(out["image_mask"], out["image_special"])
  tm = filip.drop_special(out["text_mask"], out["text_special"])
  assert np.asarray(tm).sum(1).min() == 1 and not np.asarray(im)[:, 0].any()
  base._close(got, losses.filip_reference(out["image_tokens"], im, out["text_tokens"], tm, base.SCALE))
  del out["text_special"]
  with pytest.raises(UserError, match="needs model outputs text_special"):
    loss.fn(out, mesh=mesh, axes=("data", "fsdp"), options=loss.options)


def test_default_options_and_schema_agree():
  section = dict(config.defaults().loss)
  # distill is the train step's term (train/objective.py), not a kernel option: off by default.
  assert section.pop("distill").teacher == ""
  assert section == {"name": "softmax", **registry.OPTIONS}
  assert losses.get_loss("softmax").options == registry.OPTIONS


@pytest.mark.parametrize("key,value,message", [
    ("impl", "rng", "unknown loss.impl 'rng' (did you mean 'ring'?); valid: all_gather, ring"),
    ("filip_token_fraction", 0.0, "loss.filip_token_fraction must be in (0, 1]"),
    ("filip_token_fraction", 1.5, "loss.filip_token_fraction must be in (0, 1]"),
    ("filip_comm_dtype", "bf16", "unknown loss.filip_comm_dtype 'bf16'"),
    ("filip_chunk", -1, "loss.filip_chunk must be a whole number >= 0"),
    ("ring_moves", "swap", "unknown loss.ring_moves 'swap' (did you mean 'swaps'?)"),
])
def test_bad_options_are_one_line_user_errors(key, value, message):
  cfg = config.merge({"loss": {"name": "filip", key: value}})
  with pytest.raises(UserError) as err:
    check_components(cfg)
  assert str(err.value).startswith(message) and "\n" not in str(err.value)
  with pytest.raises(UserError, match="unknown loss option 'loss.impls' \\(did you mean 'impl'\\?\\)"):
    registry.check_options({"impls": "ring"})

"""Memory and speed features: GradCache, remat, scan, mixed precision, LAMB, init_from."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret.data.pipeline import train_iterator
from jaxret.models.two_tower import scanned, unscanned
from jaxret.parallel import partitioning
from jaxret.experiment import Experiment
from jaxret.train.loop import train
from jaxret.experiment import init_state
from jaxret.train.step import loss_and_grads
from jaxret.workdir import read_metrics

STEPS = ("total_steps=3", "checkpoint.every=0", "optim.warmup_steps=1")


def first_batch(exp):
  cfg = exp.cfg
  it = train_iterator(cfg.data.dir, batch_size=cfg.batch_size, text_len=cfg.model.text.max_len,
                      seed=0)
  sh = partitioning.batch_sharding(exp.mesh)
  return {k: jax.device_put(v, sh) for k, v in next(it).items()}


@pytest.mark.parametrize("loss", ["softmax", "sigmoid", "filip"])
def test_grad_cache_equals_the_one_batch_gradient(tiny_config, loss):
  exp = Experiment(tiny_config(loss))
  state = init_state(exp.model, exp.tx, exp.mesh, 64, 0, exp.state_sh)
  batch = first_batch(exp)

  def run(steps):
    fn = jax.jit(lambda p, b: loss_and_grads(exp.model, exp.loss, p, b, mesh=exp.mesh,
                                             accum_steps=steps))
    with partitioning.activate(exp.mesh):
      value, _, grads = fn(state.params, batch)
    return float(value), grads

  want_value, want = run(1)
  value, got = run(4)  # micro-batches of 4 over the 8 devices' 16 rows
  assert abs(value - want_value) < 1e-5
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
    # The temperature's gradient comes only from the loss, not from the backprop pass.
  assert abs(float(want["t"])) > 0


def losses(workdir):
  return np.array([r["loss"] for r in read_metrics(workdir) if "loss" in r])


@pytest.fixture(scope="module")
def plain_run(tiny_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("plain"))
  train(tiny_config("softmax", *STEPS), workdir, progress=False)
  return losses(workdir)


@pytest.fixture(scope="module")
def plain_grads(tiny_config):
  exp = Experiment(tiny_config("softmax"))
  params = init_state(exp.model, exp.tx, exp.mesh, 64, 0, exp.state_sh).params
  batch = first_batch(exp)
  return params, batch, grads_of(exp, params, batch)


def grads_of(exp, params, batch):
  fn = jax.jit(lambda p, b: loss_and_grads(exp.model, exp.loss, p, b, mesh=exp.mesh)[::2])
  with partitioning.activate(exp.mesh):
    value, grads = fn(params, batch)
  return float(value), unscanned(jax.device_get(grads))


@pytest.mark.parametrize("overrides", [
    ("model.remat=full",), ("model.remat=dots",), ("model.scan=true",),
    ("model.scan=true", "model.remat=dots_no_batch"),
])
def test_remat_and_scan_give_the_plain_loss_and_gradients(tiny_config, plain_grads, overrides):
  """Same weights (stacked for scan), same batch: same loss and gradients."""
  params, batch, (want_value, want) = plain_grads
  exp = Experiment(tiny_config("softmax", *overrides))
  if exp.cfg.model.scan:
    params = jax.device_put(scanned(jax.device_get(params)), exp.state_sh.params)
  value, got = grads_of(exp, params, batch)
  assert abs(value - want_value) < 1e-5
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_grad_cache_trains_like_one_batch(tiny_config, plain_run, tmp_path):
  train(tiny_config("softmax", *STEPS, "optim.grad_accum_steps=2"), str(tmp_path),
        progress=False)
  np.testing.assert_allclose(losses(str(tmp_path)), plain_run, atol=1e-5, rtol=0)


def test_scanned_params_round_trip_to_the_per_block_layout(tiny_config):
  plain = Experiment(tiny_config("softmax"))
  scan = Experiment(tiny_config("softmax", "model.scan=true"))
  p = init_state(plain.model, plain.tx, plain.mesh, 64, 0, plain.state_sh).params
  s = scan.abstract_state.params
  assert s["image"]["encoder"]["layers"]["block"]["ln1"]["scale"].shape == (1, 32)
  stacked = scanned(jax.device_get(p))
  assert jax.tree.structure(stacked) == jax.tree.structure(s)
  back = unscanned(stacked)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(jax.device_get(p))):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_keeps_float32_state(tiny_config, plain_run, tmp_path):
  cfg = tiny_config("softmax", *STEPS, "model.dtype=bfloat16", "optim.mu_dtype=bfloat16")
  exp = Experiment(cfg)
  leaves = jax.tree.leaves(exp.abstract_state.params)
  assert all(x.dtype == jnp.float32 for x in leaves)
  adam = exp.abstract_state.opt_state[1][0]
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(adam.mu))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adam.nu))
  state = init_state(exp.model, exp.tx, exp.mesh, 64, 0, exp.state_sh)
  batch = first_batch(exp)
  with partitioning.activate(exp.mesh):
    out = jax.jit(lambda p, b: exp.model.apply({"params": p}, b["image"], b["text"]))(
        state.params, batch)
  plain = Experiment(tiny_config("softmax", *STEPS))
  with partitioning.activate(plain.mesh):
    ref = jax.jit(lambda p, b: plain.model.apply({"params": p}, b["image"], b["text"]))(
        state.params, batch)
  # bf16 has 8 bits of mantissa: embeddings agree to about 1e-2, not 1e-6.
  np.testing.assert_allclose(out["image_emb"], ref["image_emb"], atol=3e-2)
  assert np.abs(np.asarray(out["image_emb"]) - np.asarray(ref["image_emb"])).max() > 0
  train(cfg, str(tmp_path), progress=False)
  np.testing.assert_allclose(losses(str(tmp_path)), plain_run, atol=5e-2)


def test_lamb_trains(tiny_config, tmp_path):
  train(tiny_config("filip", *STEPS, "optim.name=lamb"), str(tmp_path), progress=False)
  assert np.all(np.isfinite(losses(str(tmp_path))))

"""A config's train step on one device with random inputs, for the benchmark scripts."""

import time

import numpy as np


def build_step(spec, overrides):
  """(step, state, batch, flops): `spec`'s train step on one device, random uint8 images and
  token ids as training feeds them, and its matmul FLOPs as the planner counts them."""
  import jax
  from jaxret import config, losses
  from jaxret.experiment import init_state, state_shardings
  from jaxret.models.two_tower import build_model
  from jaxret.optim import make_optimizer
  from jaxret.parallel import partitioning
  from jaxret.parallel.mesh import make_mesh
  from jaxret.train.flops import jaxpr_matmul_flops
  from jaxret.train.step import make_train_step
  cfg = config.load(spec, overrides)
  m = cfg.model
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  model = build_model(m, pad_id=0, eos_id=m.text.vocab_size - 1)
  tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  _, sh = state_shardings(model, tx, mesh, m.image.size)
  state = init_state(model, tx, mesh, m.image.size, 0, sh)
  step = make_train_step(model, losses.get_loss(cfg.loss.name, cfg.loss), tx, schedule, mesh, sh)
  rng = np.random.default_rng(0)
  b, s, n = cfg.batch_size, m.image.size, m.text.max_len
  text = rng.integers(3, m.text.vocab_size - 1, (b, n)).astype(np.int32)
  text[:, n // 2] = m.text.vocab_size - 1  # an end token mid-way, padding after
  text[:, n // 2 + 1:] = 0
  bsh = partitioning.batch_sharding(mesh)
  batch = {"image": jax.device_put(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), bsh),
           "text": jax.device_put(text, bsh)}
  with partitioning.activate(mesh):
    flops = float(jaxpr_matmul_flops(step.jitted.trace(state, batch, {}).jaxpr.jaxpr))
  return step, state, batch, flops


def step_rate(spec, overrides, steps, warmup=2):
  """(examples/s, matmul FLOPs per step) of `spec`'s train step on one device."""
  import jax
  step, state, batch, flops = build_step(spec, overrides)
  for _ in range(warmup):  # compile, warm up
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return batch["text"].shape[0] * steps / (time.perf_counter() - t), flops

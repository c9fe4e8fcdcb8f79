"""Full train step (forward, backward, AdamW) throughput: jaxret vs open_clip, same model.

  python benchmarks/train_step.py              # the small CLIP of issue 4, batch 64, fp32
  python benchmarks/train_step.py --batch 128 --steps 30

Both sides: ViT patch 16 at 64x64, width 256, 4 layers, 4 heads, MLP 1024, exact GELU,
LayerNorm eps 1e-5; causal text transformer, context 32, width 256, 4 layers; embeddings 256;
CLIP softmax loss with a learnable temperature; AdamW. Random inputs (the data pipeline is
benchmarked separately). The two are timed in alternating rounds so machine load hits both,
and the table reports medians. The script restarts itself with huge pages for glibc's large
allocations, as the `jaxret` command does (jaxret/hugepages.py), so both frameworks run on
them; JAXRET_HUGEPAGES=0 runs both on glibc's defaults. MFU divides the train step's matmul FLOPs
(jaxret/train/flops.py, as `jaxret inspect` counts them) by the machine's measured fp32 matmul rate: on a CPU
there is no datasheet peak.
Needs torch==2.13.0 and open-clip-torch==3.3.0 (installed with --no-deps: see below).
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
import types

from jaxret import hugepages

hugepages.reexec_if_needed()  # first: glibc reads its tunables at start-up

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

WIDTH, LAYERS, HEADS, MLP, VOCAB, CONTEXT, IMAGE, PATCH = 256, 4, 4, 1024, 1000, 32, 64, 16


# ----------------------------------------------------------------------------- jaxret
def jaxret_step(batch_size):
  from jaxret import config, losses
  from jaxret.models.two_tower import build_model
  from jaxret.parallel import partitioning
  from jaxret.parallel.mesh import make_mesh
  from jaxret.optim import make_optimizer
  from jaxret.experiment import init_state, state_shardings
  from jaxret.train.flops import jaxpr_matmul_flops
  from jaxret.train.step import make_train_step

  cfg = config.defaults()
  with cfg.unlocked():
    cfg.batch_size = batch_size
    cfg.model.update(embed_dim=WIDTH, act="gelu", ln_eps=1e-5)
    cfg.model.image.update(size=IMAGE, patch_size=PATCH, width=WIDTH, depth=LAYERS,
                           num_heads=HEADS, mlp_dim=MLP, pool="cls", pre_norm=True,
                           patch_bias=False)
    cfg.model.text.update(vocab_size=VOCAB, max_len=CONTEXT, width=WIDTH, depth=LAYERS,
                          num_heads=HEADS, mlp_dim=MLP, causal=True, pool="eos")
    cfg.optim.update(lr=1e-4, warmup_steps=1, weight_decay=0.1, grad_clip_norm=0.0)
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  model = build_model(cfg.model, vocab_size=VOCAB, pad_id=0, eos_id=VOCAB - 1)
  loss = losses.get_loss("softmax", cfg.loss)
  tx, schedule = make_optimizer(cfg.optim, 1000)
  _, sh = state_shardings(model, tx, mesh, IMAGE)
  state = init_state(model, tx, mesh, IMAGE, 0, sh)
  step = make_train_step(model, loss, tx, schedule, mesh, sh)
  rng = np.random.default_rng(0)
  bsh = partitioning.batch_sharding(mesh)
  text = rng.integers(1, VOCAB - 1, (batch_size, CONTEXT)).astype(np.int32)
  text[:, -1] = VOCAB - 1
  batch = {"image": jax.device_put(rng.normal(size=(batch_size, IMAGE, IMAGE, 3)).astype(
               np.float32), bsh),
           "text": jax.device_put(text, bsh)}
  with partitioning.activate(mesh):
    # The planner's counter: matmul FLOPs of the traced step (XLA's cost analysis counts a
    # scanned layer once).
    flops = float(jaxpr_matmul_flops(step.jitted.trace(state, batch, {}).jaxpr.jaxpr))
  holder = {"state": state}

  def run(n):
    for _ in range(n):
      holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])
  return run, flops


# ----------------------------------------------------------------------------- open_clip
def load_open_clip():
  """open_clip's model and loss modules, without the package __init__ (which imports
  torchvision's transforms). This machine has no CPU build of torchvision; open_clip's ViT
  CLIP never uses it, only ResNet towers import FrozenBatchNorm2d, so a stand-in for that one
  name is registered, and an empty HF text-encoder module."""
  spec = importlib.util.find_spec("open_clip")
  root = spec.submodule_search_locations[0]
  if "torchvision" not in sys.modules:
    tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops",
                                                   "torchvision.ops.misc"))

    class FrozenBatchNorm2d:  # noqa: D401 (never instantiated by a ViT CLIP)
      def __init__(self, *a, **k):
        raise RuntimeError("torchvision stand-in: ResNet towers are not benchmarked")
    misc.FrozenBatchNorm2d = FrozenBatchNorm2d
    tv.ops, ops.misc = ops, misc
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc})
  package = types.ModuleType("open_clip")
  package.__path__ = [root]
  sys.modules.setdefault("open_clip", package)
  # The HF text-encoder wrapper (not used: the text tower here is open_clip's own) would
  # import transformers, which probes for torchvision.
  hf = types.ModuleType("open_clip.hf_model")
  hf.HFTextEncoder = None
  sys.modules.setdefault("open_clip.hf_model", hf)
  import open_clip.loss
  import open_clip.model
  return open_clip.model, open_clip.loss


def open_clip_step(batch_size):
  import torch
  model_mod, loss_mod = load_open_clip()
  torch.manual_seed(0)
  model = model_mod.CLIP(
      embed_dim=WIDTH,
      vision_cfg=model_mod.CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS,
                                         mlp_ratio=MLP / WIDTH, patch_size=PATCH,
                                         image_size=IMAGE),
      text_cfg=model_mod.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH,
                                     heads=HEADS, layers=LAYERS, mlp_ratio=MLP / WIDTH),
      quick_gelu=False, output_dict=True)
  model.train()
  loss_fn = loss_mod.ClipLoss()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.normal(size=(batch_size, 3, IMAGE, IMAGE)).astype(np.float32))
  text = torch.from_numpy(rng.integers(1, VOCAB - 1, (batch_size, CONTEXT)))
  text[:, -1] = VOCAB - 1

  def run(n):
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      out = model(images, text)
      loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
      loss.backward()
      opt.step()
  return run


def matmul_rate(n=2048, repeats=5):
  """Attainable fp32 FLOP/s on this machine: a large jitted matmul."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=20, help="steps per timed round")
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args()

  import torch
  load = os.getloadavg()[0]
  if load > 0.5 * os.cpu_count():
    # torch's OpenMP threads spin at barriers: on a busy machine they slow down many times
    # more than XLA's pool, and the ratio measures the load, not the frameworks.
    print(f"warning: load average {load:.1f} on {os.cpu_count()} cores; figures from a busy "
          "machine are not comparable", file=sys.stderr)
  jx, flops = jaxret_step(args.batch)
  oc = open_clip_step(args.batch)
  jx(3), oc(3)  # warm up: compile, allocator, caches
  rates = {"jaxret": [], "open_clip": []}
  for _ in range(args.rounds):
    for name, run in (("jaxret", jx), ("open_clip", oc)):
      t = time.perf_counter()
      run(args.steps)
      rates[name].append(args.batch * args.steps / (time.perf_counter() - t))
  peak = matmul_rate()
  j, o = statistics.median(rates["jaxret"]), statistics.median(rates["open_clip"])
  print(f"train step, small CLIP (ViT {IMAGE}px/{PATCH}, width {WIDTH}, {LAYERS}+{LAYERS} layers, "
        f"text context {CONTEXT}), batch {args.batch}, fp32, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, jax {jax.__version__}")
  print(f"{'impl':<10}{'examples/s':>12}{'range':>20}{'MFU':>8}")
  for name, med in (("jaxret", j), ("open_clip", o)):
    lo, hi = min(rates[name]), max(rates[name])
    mfu = f"{100 * med / args.batch * flops / peak:.1f}%" if name == "jaxret" else "-"
    print(f"{name:<10}{med:>12.1f}{f'{lo:.1f}-{hi:.1f}':>20}{mfu:>8}")
  print(f"ratio jaxret/open_clip: {j / o:.2f}  (train step {flops / 1e9:.2f} GFLOP, measured "
        f"matmul rate {peak / 1e9:.1f} GFLOP/s, load average at start {load:.1f})")
  print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")


if __name__ == "__main__":
  main()

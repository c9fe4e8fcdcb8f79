"""One accelerator's figures in one call: `benchmarks/device.sh` runs this (after installing
what the machine lacks). Prints markdown tables to paste into BENCHMARKS.md, and writes them
to --out.

  python benchmarks/device.py [--out device.md] [--batches 256] [--smoke]

1. The SigLIP B/16 train step (configs/siglip_b16.py, bf16, 224 px, context 64, sigmoid
   loss, AdamW) at each batch of --batches, for each attention implementation this backend
   has (model.attention: xla, cudnn on GPU, splash on TPU): examples/s, and MFU = the step's
   matmul FLOPs (jaxret/train/flops.py, as `jaxret inspect` counts them) x steps/s over the
   chip's datasheet dense bf16 peak (PEAK_BF16; unknown chips print "-").
2. The loss kernels on one device (local tiles, no ring): jaxret's kernel (softmax and
   sigmoid: all_gather form; FILIP: tiles of 32 examples and the paper's 25% token
   selection) against the plain reference jitted (big_vision's form), fwd+bwd, at a fixed
   list of global batches. Memory is XLA's temp size of the compiled program; a batch whose
   program needs more than the device has is not run ("does not fit"), so the last row
   that runs is the largest global batch that fits.
3. The data pipeline at 224 px: 224 px JPEG records (benchmarks/data.py's), decode, random
   resized crop, tokenize, batch: examples/s with 0 workers (in-process: one core) and with
   one worker per core up to 8.
4. Ring moves (loss.ring_moves): with two or more devices, `python benchmarks/losses.py
   --moves-only` is the table that sets this backend's entry; with one device it is skipped.

--smoke runs every part at toy sizes on any backend (the test suite runs it on a CPU).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jaxret import hugepages

hugepages.reexec_if_needed()  # a no-op beside a GPU/TPU plugin; on a CPU, as `jaxret` does

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from steps import step_rate  # noqa: E402  (benchmarks/steps.py, beside this script)

ROOT = Path(__file__).resolve().parents[1]
# Datasheet dense bf16 peak per chip, FLOP/s (sparsity not counted). Matched by substring of
# jax's device_kind, first match wins.
PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
             ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12))
NI, NT, DIM = 50, 77, 256  # FILIP tokens as benchmarks/losses.py (ViT-B/32 at 224, context 77)


def peak(kind):
  return next((p for name, p in PEAK_BF16 if name.lower() in kind.lower()), None)


def attention_impls(platform):
  from jaxret.models import attention
  return [a for a in attention.IMPLEMENTATIONS
          if attention.for_platform(a, platform, "bfloat16") == a]


def train_step_rows(batches, smoke):
  """(attention, batch, examples/s, GFLOP per step, MFU) per implementation and batch."""
  platform, kind = jax.default_backend(), jax.devices()[0].device_kind
  spec = str(ROOT / "configs/siglip_b16.py")
  common = ["model.dtype=bfloat16", "model.scan=true", "model.text.vocab_size=32000"]
  if smoke:  # the same step at toy size
    common += ["model.image.size=32", "model.image.width=64", "model.image.depth=1",
               "model.image.num_heads=2", "model.image.mlp_dim=128", "model.text.width=64",
               "model.text.depth=1", "model.text.num_heads=2", "model.text.mlp_dim=128",
               "model.text.max_len=16", "model.embed_dim=64", "model.text.vocab_size=500"]
  rows = []
  for impl in attention_impls(platform):
    for batch in batches:
      try:
        rate, flops = step_rate(spec, common + [f"batch_size={batch}", f"model.attention={impl}"],
                                steps=2 if smoke else 10)
      except Exception as e:  # noqa: BLE001 - out of memory at a batch is a result too
        rows.append((impl, batch, f"fails: {type(e).__name__}", "-", "-"))
        continue
      p = peak(kind)
      mfu = f"{100 * flops * rate / batch / p:.1f}%" if p else "-"
      rows.append((impl, batch, f"{rate:.0f}", f"{flops / 1e9:.4g}", mfu))
      print(f"  train step {impl} batch {batch}: {rate:.0f} examples/s, MFU {mfu}", flush=True)
  return rows


def _loss_inputs(name, batch):
  """Unit embeddings made on the device (jax.random: the largest are gigabytes)."""
  keys = jax.random.split(jax.random.key(0), 3)
  unit = lambda k, shape: (lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True))(
      jax.random.normal(k, shape, jnp.float32))
  if name == "filip":
    lengths = jax.random.randint(keys[2], (batch,), 5, NT + 1)
    return (unit(keys[0], (batch, NI, DIM)), jnp.ones((batch, NI), bool),
            unit(keys[1], (batch, NT, DIM)), jnp.arange(NT)[None] < lengths[:, None],
            jnp.float32(10.0))
  args = (unit(keys[0], (batch, DIM)), unit(keys[1], (batch, DIM)), jnp.float32(10.0))
  return args + (jnp.float32(-10.0),) if name == "sigmoid" else args


def _loss_fn(name, form, mesh):
  import functools
  from jaxret import losses
  if form == "reference":
    return {"softmax": losses.softmax_reference, "sigmoid": losses.sigmoid_reference,
            "filip": losses.filip_reference}[name]
  kernel = {"softmax": losses.softmax_loss, "sigmoid": losses.sigmoid_loss,
            "filip": losses.filip_loss}[name]
  extra = dict(token_fraction=0.25, chunk=32) if name == "filip" else {}
  return functools.partial(kernel, mesh=mesh, axes=("data", "fsdp"), impl="all_gather", **extra)


def loss_rows(smoke):
  """(loss, form, global B, temp GiB, fwd+bwd ms or why not) on one device."""
  argnums = {"softmax": (0, 1, 2), "sigmoid": (0, 1, 2, 3), "filip": (0, 2, 4)}
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit", 0)
  pooled = (64, 128) if smoke else (16384, 65536, 262144)
  tokens = (16, 32) if smoke else (1024, 4096, 16384, 65536)
  rows = []
  for name, sweep in (("softmax", pooled), ("sigmoid", pooled), ("filip", tokens)):
    for form in ("reference", "jaxret"):
      for batch in sweep:
        fn = jax.jit(jax.value_and_grad(_loss_fn(name, form, mesh), argnums=argnums[name]))
        shapes = jax.eval_shape(lambda: _loss_inputs(name, batch))
        try:
          compiled = fn.lower(*shapes).compile()
        except Exception as e:  # noqa: BLE001 - too big to compile is a result too
          rows.append((name, form, batch, "-", f"does not compile: {type(e).__name__}"))
          break
        temp = compiled.memory_analysis().temp_size_in_bytes
        if limit and temp > limit:
          rows.append((name, form, batch, f"{temp / 2**30:.1f}", "does not fit"))
          break
        args = jax.jit(_loss_inputs, static_argnums=(0, 1))(name, batch)
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(3 if smoke else 5):
          t = time.perf_counter()
          jax.block_until_ready(compiled(*args))
          times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1e3
        rows.append((name, form, batch, f"{temp / 2**30:.2f}", f"{ms:.1f}"))
        print(f"  {name} {form} B={batch}: {temp / 2**30:.2f} GiB, {ms:.1f} ms", flush=True)
        del args
  return rows


def data_rows(smoke):
  """(workers, examples/s, examples/s per core) for 224 px JPEG records."""
  import data as data_bench  # benchmarks/data.py, beside this script
  cores = os.cpu_count() or 1
  records, batch, batches = (32, 8, 2) if smoke else (1024, 64, 30)
  rows = []
  with tempfile.TemporaryDirectory() as d:
    out = Path(d)
    data_bench.build(out, records)
    for workers in sorted({0, 1 if smoke else min(8, cores)}):
      rate = data_bench.measure(out, workers, batch, batches, 224, 64)
      rows.append((workers, f"{rate:.0f}", f"{rate / max(1, workers):.0f}"))
      print(f"  data pipeline, {workers} workers: {rate:.0f} examples/s", flush=True)
  return rows


def table(head, rows):
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="device.md", help="where the tables are written")
  p.add_argument("--batches", default="256",
                 help="comma-separated batch sizes of the train step (fixed, so runs compare)")
  p.add_argument("--smoke", action="store_true", help="toy sizes: checks the script anywhere")
  p.add_argument("--skip", default="", help="comma-separated parts to skip: step,loss,data")
  a = p.parse_args()
  skip = set(filter(None, a.skip.split(",")))
  batches = [4] if a.smoke else [int(b) for b in a.batches.split(",")]
  device = jax.devices()[0]
  kind, platform = device.device_kind, jax.default_backend()
  stats = device.memory_stats() or {}
  head = (f"{jax.device_count()} x {kind} ({platform}); jax {jax.__version__}, Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} host cores; "
          f"{stats.get('bytes_limit', 0) / 2**30:.0f} GiB for XLA; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
          + ("; SMOKE (toy sizes)" if a.smoke else ""))
  print(head, flush=True)
  out = [f"Device: {head}", "", "Command: `bash benchmarks/device.sh`", ""]
  if "step" not in skip:
    out += ["SigLIP B/16 train step, bf16, 224 px (configs/siglip_b16.py), one device:", ""]
    out += table(("attention", "batch", "examples/s", "GFLOP/step", "MFU (datasheet peak)"),
                 train_step_rows(batches, a.smoke)) + [""]
  if "loss" not in skip:
    out += ["Loss kernels fwd+bwd on one device (jaxret: local tiles; FILIP 25% tokens, "
            "tiles of 32); reference: the plain formula jitted:", ""]
    out += table(("loss", "form", "global B", "temp GiB", "ms"), loss_rows(a.smoke)) + [""]
  if "data" not in skip:
    out += ["Data pipeline, 224 px JPEG records (decode, crop, tokenize, batch):", ""]
    out += table(("workers", "examples/s", "per worker (0: one core)"), data_rows(a.smoke)) + [""]
  if jax.device_count() >= 2:
    out += ["Ring moves: run `python benchmarks/losses.py --moves-only` for this backend's "
            "entry of RING_MOVES.", ""]
  else:
    out += ["Ring moves: one device, no ring: not measured.", ""]
  text = "\n".join(out)
  Path(a.out).write_text(text + "\n")
  print("\n" + text)


if __name__ == "__main__":
  main()

"""Loss kernels: per-device temporary memory and fwd+bwd time, on simulated CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/losses.py

Prints one table. Memory is `temp_size_in_bytes` of the compiled value_and_grad (per device:
the SPMD program is one device's). Time is the median of a few steps after a warm-up;
a row is timed only when its estimated work fits the --max-seconds budget ("-" otherwise).
Baselines, named for what they run:
  gspmd   big_vision's jit form: the plain reference (jnp.dot(zimg, ztxt.T) and its loss) jitted
          on batch-sharded inputs, split by GSPMD however it chooses (`--impls gspmd`).
  naive   gather-all: every device all-gathers the whole batch and evaluates the reference
          (B x B logits; B x B x Ni x Nt for FILIP). An upper bound, not what big_vision runs.
FILIP: 50 image tokens (ViT-B/32 at 224), 77 text tokens, d = 256, tiles of 32 examples.

A second table compares ring with all_gather at equal B on 8 devices, and a third the ring's
two ways of moving blocks (loss.ring_moves: ppermute, or pair swaps), both timed interleaved
(the two alternate, in alternating order) so that load from other processes hits both alike;
the ratio is the median of the per-round ratios. The third table is what the per-backend
RING_MOVES entry in jaxret/losses/common.py rests on: run `--moves-only` on a backend with two or
more devices to measure its entry.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxret import losses  # noqa: E402

AXES = ("data", "fsdp")
NI, NT, DIM, CHUNK = 50, 77, 256, 32
ARGNUMS = {"softmax": (0, 1, 2), "sigmoid": (0, 1, 2, 3), "filip": (0, 2, 4)}
REFERENCES = {"softmax": losses.softmax_reference, "sigmoid": losses.sigmoid_reference,
              "filip": losses.filip_reference}
# Rough fp32 throughput of this machine for the time budget check only (flop/s).
FLOPS = 30e9


def mesh_of(devices):
  return jax.make_mesh((devices, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:devices])


def naive(name, mesh):
  """Every device gathers everything and computes the reference on the full batch."""
  def local(*args):
    n_batch = 4 if name == "filip" else 2
    full = [jax.lax.all_gather(a, AXES, tiled=True, to="invarying") for a in args[:n_batch]]
    return REFERENCES[name](*full, *args[n_batch:])
  n_batch = 4 if name == "filip" else 2
  n_scalar = {"softmax": 1, "sigmoid": 2, "filip": 1}[name]
  return jax.shard_map(local, mesh=mesh, in_specs=(P(AXES),) * n_batch + (P(),) * n_scalar,
                       out_specs=P())


def loss_fn(name, impl, mesh, fraction, moves="auto"):
  if impl == "naive":
    return naive(name, mesh)
  if impl == "gspmd":  # the inputs arrive batch-sharded (inputs()); XLA partitions the rest
    return REFERENCES[name]
  kernel = {"softmax": losses.softmax_loss, "sigmoid": losses.sigmoid_loss, "filip": losses.filip_loss}[name]
  extra = dict(token_fraction=fraction, chunk=CHUNK) if name == "filip" else {}
  return functools.partial(kernel, mesh=mesh, axes=AXES, impl=impl, moves=moves, **extra)


def inputs(name, batch, mesh):
  rng = np.random.default_rng(0)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  shard = NamedSharding(mesh, P(AXES))
  put = lambda x: jax.device_put(x, shard)
  scalar = lambda v: jnp.float32(v)
  if name == "filip":
    lengths = rng.integers(5, NT + 1, size=batch)  # ragged captions
    text_mask = np.arange(NT)[None] < lengths[:, None]
    return (put(unit(rng.normal(size=(batch, NI, DIM)))), put(np.ones((batch, NI), bool)),
            put(unit(rng.normal(size=(batch, NT, DIM)))), put(text_mask), scalar(10.0))
  args = (put(unit(rng.normal(size=(batch, DIM)))), put(unit(rng.normal(size=(batch, DIM)))), scalar(10.0))
  return args + (scalar(-10.0),) if name == "sigmoid" else args


def flops(name, impl, batch, fraction):
  """Forward+backward multiply-adds x 2, roughly, for the time budget."""
  if name == "filip":
    ni, nt = (NI, NT) if fraction >= 1 else (int(np.ceil(fraction * NI)), int(np.ceil(fraction * NT)))
    return 2 * DIM * batch * batch * ni * nt * 4
  return 2 * DIM * batch * batch * (8 if impl in ("naive", "gspmd") else 4)


def measure(name, impl, devices, batch, fraction, max_seconds, repeats):
  mesh = mesh_of(devices)
  args = inputs(name, batch, mesh)
  fn = jax.jit(jax.value_and_grad(loss_fn(name, impl, mesh, fraction), argnums=ARGNUMS[name]))
  compiled = fn.lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  seconds = None
  # naive FILIP's B x B x Ni x Nt on every simulated device must also fit this host's RAM.
  fits_ram = temp * devices < 12 * 2**30
  if fits_ram and flops(name, impl, batch, fraction) / FLOPS < max_seconds:
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
  return temp, seconds


def rows(args):
  sweep = [256, 512, 1024, 2048, 4096, 8192]
  plan = []
  if args.ratios_only or args.moves_only:
    return plan
  if args.scaling_only:
    sweep = []
  for name in ("softmax", "sigmoid"):
    for impl in ("gspmd", "naive", "all_gather", "ring"):
      plan += [(name, impl, 8, b, 1.0) for b in sweep]
  for fraction in (1.0, 0.25):
    for impl in ("gspmd", "naive", "all_gather", "ring"):
      if impl in ("gspmd", "naive") and fraction < 1:
        continue
      plan += [("filip", impl, 8, b, fraction)
               for b in (sweep[:3] if impl in ("gspmd", "naive") else sweep)]
  # Fixed local batch b, growing device count: the ring's memory follows b, GSPMD's and the
  # gather's follow B.
  for name, local in (("softmax", 512), ("sigmoid", 512), ("filip", 64)):
    for impl in ("gspmd", "all_gather", "ring"):
      plan += [(name, impl, d, local * d, 1.0) for d in (1, 2, 4, 8)]
  return [row for row in plan if row[0] in args.losses and row[1] in args.impls]


def ratios(name, batch, rounds, max_seconds, forms=(("all_gather", "auto"), ("ring", "auto"))):
  """(first ms, second ms, median of per-round second/first) for two (impl, moves) forms on
  all devices, or None over budget."""
  if flops(name, "all_gather", batch, 1.0) / FLOPS > max_seconds:
    return None
  mesh = mesh_of(jax.device_count())
  args = inputs(name, batch, mesh)
  fns = [jax.jit(jax.value_and_grad(loss_fn(name, impl, mesh, 1.0, moves), argnums=ARGNUMS[name]))
         .lower(*args).compile() for impl, moves in forms]
  for fn in fns:
    jax.block_until_ready(fn(*args))  # warm-up
  start = time.perf_counter()
  jax.block_until_ready(fns[0](*args))
  calls = max(1, min(20, int(0.02 / (time.perf_counter() - start))))  # >= ~20 ms a sample

  def sample(fn):
    start = time.perf_counter()
    for _ in range(calls):
      jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / calls

  times = [[], []]
  for r in range(rounds):
    for i in ((0, 1) if r % 2 == 0 else (1, 0)):
      times[i].append(sample(fns[i]))
  ratio = statistics.median(ring / gather for gather, ring in zip(*times))
  return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3, ratio


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max-seconds", type=float, default=30.0,
                      help="time a row only if its rough fwd+bwd estimate is below this")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--losses", default="softmax,sigmoid,filip",
                      help="comma-separated losses for the first table")
  parser.add_argument("--rounds", type=int, default=9,
                      help="interleaved rounds per row of the ring/all_gather table (0: skip it)")
  parser.add_argument("--impls", default="gspmd,naive,all_gather,ring",
                      help="comma-separated rows of the first table")
  parser.add_argument("--ratios-only", action="store_true", help="print only the second table")
  parser.add_argument("--scaling-only", action="store_true",
                      help="first table: only the rows at fixed local batch over 1-8 devices")
  parser.add_argument("--moves-only", action="store_true",
                      help="print only the third table (ring moves: ppermute vs swaps)")
  args = parser.parse_args()
  args.losses = args.losses.split(",")
  args.impls = args.impls.split(",")
  print(f"jax {jax.__version__}, {jax.device_count()} simulated {jax.devices()[0].platform} devices, "
        f"{os.cpu_count()} host cores; FILIP Ni={NI} Nt={NT} d={DIM} chunk={CHUNK}")
  plan = rows(args)
  if plan:
    print(f"| loss | impl | tokens | devices | global B | local b | temp MiB/device | fwd+bwd ms |")
    print("|---|---|---|---|---:|---:|---:|---:|")
  for name, impl, devices, batch, fraction in plan:
    tokens = "" if name != "filip" else ("all" if fraction >= 1 else f"{fraction:.0%}")
    try:
      temp, seconds = measure(name, impl, devices, batch, fraction, args.max_seconds, args.repeats)
      ms = "-" if seconds is None else f"{seconds * 1e3:.0f}"
      mib = f"{temp / 2**20:.1f}"
    except Exception as e:  # noqa: BLE001 - a row that does not compile is a result too
      mib, ms = f"fails: {type(e).__name__}", "-"
    print(f"| {name} | {impl} | {tokens} | {devices} | {batch} | {batch // devices} | {mib} | {ms} |",
          flush=True)
  if args.rounds and not args.moves_only:
    print(f"\nring vs all_gather, 8 devices, {args.rounds} interleaved rounds\n")
    print("| loss | global B | all_gather ms | ring ms | ring / all_gather |")
    print("|---|---:|---:|---:|---:|")
    for name in ("softmax", "sigmoid"):
      for batch in (256, 512, 1024, 2048, 4096, 8192):
        out = ratios(name, batch, args.rounds, args.max_seconds)
        cells = "- | - | -" if out is None else f"{out[0]:.1f} | {out[1]:.1f} | {out[2]:.2f}x"
        print(f"| {name} | {batch} | {cells} |", flush=True)
  if args.rounds and not args.ratios_only:
    backend = jax.default_backend()
    print(f"\nring moves on {backend} ({jax.device_count()} devices, {args.rounds} interleaved "
          f"rounds): ppermute vs pair swaps; jaxret's table says {backend}: "
          f"{losses.common.ring_moves('auto', backend)}\n")
    print("| loss | global B | block KiB | ppermute ms | swaps ms | swaps / ppermute |")
    print("|---|---:|---:|---:|---:|---:|")
    # Blocks over common.SMALL_BLOCK_BYTES travel by ppermute either way (FILIP's token blocks
    # at 77 tokens are over it from 8 examples a device), so the sweep stays under it.
    for name in ("softmax", "sigmoid"):
      for batch in (256, 1024, 2048):
        out = ratios(name, batch, args.rounds, args.max_seconds,
                     forms=(("ring", "ppermute"), ("ring", "swaps")))
        local = batch // jax.device_count()
        kib = local * DIM * 4 / 1024
        cells = "- | - | -" if out is None else f"{out[0]:.1f} | {out[1]:.1f} | {out[2]:.2f}x"
        print(f"| {name} | {batch} | {kib:.0f} | {cells} |", flush=True)


if __name__ == "__main__":
  main()

"""Search latency over a 1M-item store, and the image embedding rate of `jaxret.load` models.

  python benchmarks/search.py [--items 1000000] [--dim 512] [--queries 20] [--k 10]

Prints one table. Search: 1M random L2-normalised float16 embeddings (what a store holds),
loaded once into a device array (the row blocks of jaxret.inference.search.Index; load not
timed), then `--queries` random unit query vectors (standing in for embedded text queries:
the query's embedding is not timed), one at a time; median latency per query, exact top-k.
Rows for the device array held as float32 (Index's default, widened from float16) and as
float16. Embedding: `Model.encode_images` on 64x64 uint8 images (the demo's size) for
configs/demo.py's model and the tests' tiny model (random weights: speed does not depend on
them), images/s after a warm-up call; batch 64.
"""
import argparse
import os
import statistics
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests' tiny model (tests/conftest.py TINY; not imported: it sets 8 simulated devices).
TINY = ["model.embed_dim=32", "model.image.patch_size=16", "model.image.width=32",
        "model.image.depth=1", "model.image.num_heads=2", "model.image.mlp_dim=64",
        "model.text.width=32", "model.text.depth=1", "model.text.num_heads=2",
        "model.text.mlp_dim=64"]


def search_rows(items, dim, queries, k, dtype):
  from jaxret.inference.search import Index
  rng = np.random.default_rng(0)
  emb = np.empty((items, dim), np.float16)
  for lo in range(0, items, 100_000):  # in blocks: float32 of 1M x 512 is 2 GiB
    x = rng.standard_normal((min(100_000, items - lo), dim), dtype=np.float32)
    emb[lo:lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
  index = Index(emb, dtype=dtype)
  q = rng.standard_normal((queries + 1, dim), dtype=np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  index.top_k(q[:1], k)  # compile
  times = []
  for row in q[1:]:
    t = time.perf_counter()
    index.top_k(row[None], k)
    times.append(time.perf_counter() - t)
  del index
  return statistics.median(times) * 1e3


def embed_rate(overrides, n):
  import flax.linen as nn
  import jax
  from jaxret import config
  from jaxret.experiment import dummy_inputs
  from jaxret.inference.model import Model
  from jaxret.models.two_tower import build_model
  from jaxret.parallel import partitioning
  from jaxret.parallel.mesh import make_mesh
  cfg = config.load(os.path.join(ROOT, "configs", "demo.py") + ":softmax", overrides)
  model = build_model(cfg.model, vocab_size=1000)
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
  size = cfg.model.image.size
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model, size, 1)))
  sh = partitioning.logical_shardings(boxed, mesh)["params"]
  params = jax.device_put(nn.unbox(model.init(jax.random.key(0),
                                              *dummy_inputs(model, size, 1)))["params"], sh)
  m = Model(model, params, None, mesh, sh, image_size=size, batch_size=64)
  images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  m.encode_images(images[:64])  # compile
  t = time.perf_counter()
  m.encode_images(images)
  return n / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--items", type=int, default=1_000_000)
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--queries", type=int, default=20)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--images", type=int, default=2048)
  args = p.parse_args()
  import jax
  rows = []
  for dtype in (np.float32, np.float16):
    ms = search_rows(args.items, args.dim, args.queries, args.k, dtype)
    rows.append((f"search, exact top-{args.k}, {args.items:,} x {args.dim}, device array "
                 f"{np.dtype(dtype).name}", f"{ms:.0f} ms/query (median of {args.queries})"))
  for name, overrides in (("demo model (configs/demo.py)", []), ("tiny model (tests)", TINY)):
    rate = embed_rate(overrides, args.images)
    rows.append((f"encode_images, {name}, 64x64", f"{rate:,.0f} images/s"))
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}")
  print("| what | figure |\n|---|---|")
  for what, fig in rows:
    print(f"| {what} | {fig} |")


if __name__ == "__main__":
  main()

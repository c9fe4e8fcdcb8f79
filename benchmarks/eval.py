"""Evaluation speed and memory: a 5k-image / 25k-caption gallery with a demo-sized model.

  python benchmarks/eval.py --data-dir /tmp/demo_full   [--loss softmax|filip] [--repeats 3]

The model is configs/demo.py's (randomly initialised: speed does not depend on the weights);
the data dir only supplies the tokenizer and image size. Images are random pixels, each with
5 random captions of 12 words (the COCO protocol's shape). Prints one table: the median over
--repeats of each stage, and the process's peak resident memory. Ranking holds at most
eval.block_elements scores at a time, whatever the gallery size.
"""
import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data-dir", default="demo_data")
  p.add_argument("--loss", default="softmax", choices=("softmax", "sigmoid", "filip"))
  p.add_argument("--images", type=int, default=5000)
  p.add_argument("--captions-per-image", type=int, default=5)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--block-elements", type=int, default=None, help="default: the config's")
  args = p.parse_args()

  import jax
  from jaxret import config
  from jaxret.eval import hubness
  from jaxret.eval.embed import Embedder
  from jaxret.eval.ranking import Ranker
  from jaxret.eval.retrieval import RetrievalEvaluator
  from jaxret.experiment import Experiment
  from jaxret.experiment import init_state

  cfg = config.load(os.path.join(ROOT, "configs", "demo.py") + ":" + args.loss,
                    [f"data.dir={args.data_dir}"])
  exp = Experiment(cfg)
  params = init_state(exp.model, exp.tx, exp.mesh, cfg.model.image.size, cfg.seed,
                      exp.state_sh).params
  late = exp.loss.similarity == "late_interaction"
  embed = Embedder(exp.model, exp.mesh, exp.state_sh.params, cfg.eval.batch_size, tokens=late)
  block = args.block_elements or cfg.eval.block_elements
  ranker = Ranker(exp.mesh, block)
  no_bank = cfg.eval.copy_and_resolve_references()
  retrieval = RetrievalEvaluator(ranker, no_bank, late)

  rng = np.random.default_rng(0)
  n, m = args.images, args.captions_per_image
  size = cfg.model.image.size
  images = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
  tok = exp.tokenizer
  words = rng.integers(4, tok.vocab_size, (n * m, 12))
  text = np.full((n * m, cfg.model.text.max_len), tok.pad_id, np.int32)
  text[:, 0], text[:, 1:13], text[:, 13] = tok.bos_id, words, tok.eos_id
  owner = np.repeat(np.arange(n), m)

  times = {k: [] for k in ("embed images", "embed captions", "rank (both directions)",
                           "hubness QB+DB (bank = gallery)", "total")}
  first = None
  for rep in range(args.repeats + 1):  # the first pass compiles; not counted
    t0 = time.perf_counter()
    emb_i = embed(params, "image", images)
    t1 = time.perf_counter()
    emb_t = embed(params, "text", text)
    t2 = time.perf_counter()
    emb = {"image": emb_i, "text": emb_t, "caption_image": owner}
    result = retrieval(emb)
    t3 = time.perf_counter()
    img, txt = emb_i["image_emb"], emb_t["text_emb"]
    for gallery, q_bank, g_bank in ((txt, img, txt), (img, txt, img)):
      hubness.qb_norm(ranker, gallery, q_bank, beta=20.0)
      hubness.db_norm(ranker, gallery, q_bank, g_bank, beta_query=20.0, beta_gallery=20.0)
    t4 = time.perf_counter()
    if not rep:
      first = t4 - t0
      continue
    for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
      times[k].append(v)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB (Linux)
  print(f"eval benchmark: {args.loss}, {n} images x {n * m} captions, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), median of {args.repeats}")
  for k, v in times.items():
    print(f"  {k:<34}{statistics.median(v):>8.1f} s   (runs: "
          + ", ".join(f"{x:.1f}" for x in v) + ")")
  print(f"  {'first pass, with compilation':<34}{first:>8.1f} s")
  print(f"  peak resident memory {peak:.2f} GiB; scores per block <= "
        f"{block * 4 / 2 ** 20:.0f} MiB")
  v = result["variants"]
  print("  variants: " + ", ".join(v) + f"; pooled i2t R@1 {100 * v['pooled']['i2t']['R@1']:.2f}% "
        f"(random model: chance is {100 * m / (n * m):.2f}%)")
  return 0


if __name__ == "__main__":
  sys.exit(main())

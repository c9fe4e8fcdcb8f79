"""Training-pipeline throughput: decoded examples/s from 224x224 JPEG records, 0/1/2 workers.

  python benchmarks/data.py [--records 1024] [--batch 64] [--batches 30] [--workers 0,1,2]
                            [--train-metrics WORKDIR/metrics.jsonl]

Builds a throwaway data dir of JPEG records (smooth colour fields plus noise, ~20 KB each,
like photos), then times `train_iterator` (decode, caption sampling, tokenize, batch) after
one warm-up batch. With --train-metrics it prints the train step's consumption (the median
examples_per_s of that run) and the headroom. Augmentation is not in the pipeline yet, so
the figures are decode + normalise + tokenize.
"""

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image


def build(out, n, size=224):
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size] / size
  w = ArrayRecordWriter(str(out / "train-00000-of-00001.array_record"), "group_size:1")
  for i in range(n):
    a, b, c = rng.random(3)
    img = np.stack([a * xx + (1 - a) * yy, b * yy, c * (1 - xx)], -1) * 255
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    w.write(msgpack.packb({"image": buf.getvalue(),
                           "captions": [f"a photo number {i}", f"picture {i} of a field"]}))
  w.close()
  from jaxret.data import tokenizers
  tokenizers.train_bpe([f"a photo number {i} picture of a field" for i in range(200)],
                       out / "tokenizer.json", vocab_size=800)
  (out / "manifest.json").write_text(json.dumps({
      "format": "jaxret-records-v1", "name": "bench", "image_size": size,
      "tokenizer": "tokenizer.json",
      "splits": {"train": {"files": ["train-00000-of-00001.array_record"], "num_records": n,
                           "sha256": {}}}}))


def measure(data_dir, workers, batch, batches):
  from jaxret.data.pipeline import train_iterator
  it = train_iterator(data_dir, batch_size=batch, text_len=77, seed=0, process_index=0,
                      process_count=1, workers=workers)
  next(it)  # start-up (worker spawn, first decode) is not throughput
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batch * batches / (time.perf_counter() - t)
  it.close()
  return rate


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--records", type=int, default=1024)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=30)
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--train-metrics", help="metrics.jsonl of a run whose consumption to compare")
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as d:
    build(Path(d), a.records)
    rows = [(w, measure(d, w, a.batch, a.batches)) for w in map(int, a.workers.split(","))]
  need = None
  if a.train_metrics:
    rates = [json.loads(line).get("examples_per_s") for line in open(a.train_metrics)]
    need = statistics.median([r for r in rates if r])
  print("| workers | examples/s (224px JPEG, decode+tokenize) |" +
        (" headroom vs train step |" if need else ""))
  print("|---|---|" + ("---|" if need else ""))
  for w, r in rows:
    print(f"| {w} | {r:.0f} |" + (f" {r / need:.1f}x |" if need else ""))
  if need:
    print(f"\ntrain step consumption ({a.train_metrics}): {need:.0f} examples/s (median)")


if __name__ == "__main__":
  main()

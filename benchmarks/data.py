"""Training-pipeline throughput next to the train steps it feeds.

  python benchmarks/data.py [--records 1024] [--batch 64] [--batches 30] [--workers 0,1,2]
                            [--no-b16]

Builds two throwaway data dirs: 224px JPEG records (smooth colour fields plus noise, ~20 KB
each, like photos) and a small build of the demo data (64px PNG scenes, 4 captions each).
Times `train_iterator` on each with 0, 1 and 2 worker processes after one warm-up batch:
decode, one caption per image, random resized crop (open_clip's scale 0.9-1) to the model's
size, tokenize, batch; uint8 pixels (the model normalises them on the device).
Then times the train step each feeds, on random inputs: the demo config (configs/demo.py,
softmax) and a B/16-shaped CLIP (configs/clip.py:b16 at batch 8, float32 on this CPU), and
prints the headroom, pipeline / step examples per second. The pipeline and the step are
timed apart; in a run they share the CPU.
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

from jaxret import hugepages

hugepages.reexec_if_needed()  # as the `jaxret` command does: glibc reads tunables at start-up

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
from array_record.python.array_record_module import ArrayRecordWriter  # noqa: E402
from PIL import Image  # noqa: E402
from steps import step_rate  # noqa: E402  (benchmarks/steps.py, beside this script)


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
  from jaxret.data import tokenizer_training
  tokenizer_training.train_bpe([f"a photo number {i} picture of a field" for i in range(200)],
                                 out / "tokenizer.json", vocab_size=800)
  (out / "manifest.json").write_text(json.dumps({
      "format": "jaxret-records-v1", "name": "bench", "image_size": size,
      "tokenizer": "tokenizer.json",
      "splits": {"train": {"files": ["train-00000-of-00001.array_record"], "num_records": n,
                           "sha256": {}}}}))


AUGMENT = dict(crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=False)


def measure(data_dir, workers, batch, batches, image_size, text_len):
  from jaxret.data.pipeline import train_iterator
  it = train_iterator(data_dir, batch_size=batch, text_len=text_len, seed=0, process_index=0,
                      process_count=1, workers=workers, image_size=image_size, augment=AUGMENT)
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
  p.add_argument("--no-b16", action="store_true", help="skip the B/16 step (slow on a CPU)")
  a = p.parse_args()
  root = Path(__file__).resolve().parents[1]
  workers = [int(w) for w in a.workers.split(",")]
  from jaxret.data.demo import build_demo
  with tempfile.TemporaryDirectory() as d:
    jpeg, demo = Path(d) / "jpeg", Path(d) / "demo"
    jpeg.mkdir()
    build(jpeg, a.records)
    build_demo(demo, num_train=max(a.records, 2 * a.batch), num_test=10, progress=False)
    demo_rows = [(w, measure(demo, w, a.batch, a.batches, 64, 20)) for w in workers]
    jpeg_rows = [(w, measure(jpeg, w, a.batch, a.batches, 224, 77)) for w in workers]
    from jaxret.data.tokenizers import load_tokenizer
    vocab = load_tokenizer(demo / "tokenizer.json", 20).vocab_size
  demo_step = step_rate(str(root / "configs/demo.py") + ":softmax",
                        [f"model.text.vocab_size={vocab}"], 20)[0]
  b16_step = None if a.no_b16 else step_rate(
      str(root / "configs/clip.py") + ":b16",
      ["batch_size=8", "model.dtype=float32", "model.remat=none", "model.scan=false",
       "model.text.vocab_size=49408"], 3)[0]
  print("| records | workers | pipeline examples/s | train step it feeds | step examples/s "
        "| headroom |")
  print("|---|---:|---:|---|---:|---:|")
  for name, rows, consumer, need in (
      ("demo, 64px PNG", demo_rows, "demo (softmax, batch 128)", demo_step),
      ("224px JPEG", jpeg_rows, "CLIP B/16 at 224 (batch 8, fp32)", b16_step)):
    for w, r in rows:
      head = f"{r / need:.1f}x" if need else "-"
      print(f"| {name} | {w} | {r:.0f} | {consumer} | {need or 0:.1f} | {head} |")


if __name__ == "__main__":
  main()

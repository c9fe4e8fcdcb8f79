"""`jaxret data convert`: image preparation speed and the peak memory of a large tar.

  python benchmarks/convert.py [--images 2000] [--size 224] [--rounds 3] [--tar-mb 1024]

(--tar-mb '' runs (a) only.)

(a) Prepares --images 640x480 JPEGs (made here with a fixed seed: smooth noise at four scales
    plus a gradient and fine grain, so they compress like photos) to --size, as the converter
    does (decode, RGB, shorter side --size, JPEG quality 95), in this process, on one core:
    images per CPU second (process time, so other load on the machine matters less than for
    wall time) with a full decode, and with PIL's draft mode (the JPEG decoder scales by 1/2 in
    the DCT domain, since 480 >= 2 x 224; the exact resize follows). Rounds alternate the two
    and the median is printed, with the mean absolute pixel difference of their outputs.
(b) Builds a webdataset tar of --tar-mb MiB (several sizes: --tar-mb 128,1024) from the same
    JPEGs repeated under new keys, each with a .txt caption, then runs
    `python -m jaxret.cli data convert --tars T --out D --workers 1` (BPE tokenizer trained on the
    captions included) from a small launcher process and reports its peak RSS (getrusage
    RUSAGE_CHILDREN ru_maxrss: the largest of the command's processes). The floor is the peak
    of a process that only imports the converter (it imports grain, hence jax).
"""

import argparse
import io
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from jaxret.data import convert

WORDS = ("a photo of the red blue small large dog cat car bike tree street people walking "
         "sitting near under over beach city night day two three man woman child").split()


def make_jpegs(n, seed=0, size=(640, 480)):
  rng = np.random.default_rng(seed)
  w, h = size
  yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
  out = []
  for _ in range(n):
    img = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 90), (16, 40), (80, 25), (320, 12)):  # coarse to fine structure
      noise = rng.random((cells * h // w, cells, 3)).astype(np.float32)
      img += amp * np.asarray(Image.fromarray((noise * 255).astype(np.uint8)).resize(
          (w, h), Image.BICUBIC), np.float32) / 255
    a, b = rng.random(2)
    img += 60 * np.stack([a * xx, b * yy, (1 - a) * xx * yy], -1)
    img += rng.normal(0, 4, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    out.append(buf.getvalue())
  return out


def prepare_speed(jpegs, size, rounds):
  """-> {draft: median images/s}, mean abs pixel difference (draft vs full)."""
  rates = {False: [], True: []}
  for _ in range(rounds):
    for draft in (False, True):
      t = time.process_time()  # CPU seconds: the dev machine is shared, wall time is not ours
      for data in jpegs:
        convert.prepare_image(data, size, draft=draft)
      rates[draft].append(len(jpegs) / (time.process_time() - t))
  diffs = []
  for data in jpegs[:200]:
    a, b = (np.asarray(Image.open(io.BytesIO(convert.prepare_image(data, size, draft=d))),
                       np.float32) for d in (False, True))
    diffs.append(np.abs(a - b).mean())
  return {d: statistics.median(r) for d, r in rates.items()}, float(np.mean(diffs))


def write_tar(path, jpegs, megabytes, seed=0):
  rnd = random.Random(seed)
  n = 0
  with tarfile.open(path, "w") as tar:
    while os.path.getsize(path) < megabytes * 2**20:
      caption = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 15))).encode()
      for ext, data in (("jpg", jpegs[n % len(jpegs)]), ("txt", caption)):
        info = tarfile.TarInfo(f"{n:09d}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
      n += 1
  return n


# A small launcher runs the command: a forked child's peak RSS starts at its parent's (the pages
# it shares before exec count), and this script holds every test JPEG.
LAUNCHER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
            "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN)"
            ".ru_maxrss, r.returncode)")


def peak_rss_mib(cmd, env=None):
  """Runs `cmd`; -> (peak RSS in MiB of it or any of its processes, seconds)."""
  with tempfile.TemporaryFile() as err:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *map(str, cmd)], env=env, stderr=err,
                         stdout=subprocess.PIPE, text=True)
    secs = time.perf_counter() - t
    maxrss, code = map(int, out.stdout.split())
    if code or out.returncode:
      err.seek(0)
      raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{err.read().decode()}")
  return maxrss / 1024, secs


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=2000)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--tar-mb", default="1024",
                 help="tar size(s) in MiB, comma-separated; '' skips (b)")
  args = p.parse_args()

  jpegs = make_jpegs(args.images)
  kb = np.mean([len(j) for j in jpegs]) / 1024
  rates, diff = prepare_speed(jpegs, args.size, args.rounds)
  print(f"(a) {args.images} JPEGs 640x480 (mean {kb:.0f} KiB) -> shorter side {args.size}, one "
        f"core, median of {args.rounds} rounds; load average {os.getloadavg()[0]:.1f}\n")
  print("| decode | images per CPU second | speed-up |")
  print("|---|---:|---:|")
  print(f"| full decode + resize | {rates[False]:.0f} | 1.00x |")
  print(f"| draft mode (1/2 scale) + resize | {rates[True]:.0f} | "
        f"{rates[True] / rates[False]:.2f}x |")
  print(f"\nmean |draft - full| per pixel: {diff:.2f} / 255\n")

  sizes = [int(x) for x in args.tar_mb.split(",") if x]
  if not sizes:
    return
  env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  floor, _ = peak_rss_mib([sys.executable, "-c", "import jaxret.data.convert"], env)
  print(f"(b) peak RSS of `jaxret data convert --tars T --workers 1` (ru_maxrss); "
        f"importing the converter alone: {floor:.0f} MiB\n")
  print("| tar MiB | samples | peak RSS MiB | seconds | images/s |")
  print("|---:|---:|---:|---:|---:|")
  for mb in sizes:
    with tempfile.TemporaryDirectory() as tmp:
      tar = Path(tmp) / "shard.tar"
      n = write_tar(tar, jpegs, mb)
      rss, secs = peak_rss_mib([sys.executable, "-m", "jaxret.cli", "data", "convert", "--tars",
                                str(tar), "--out", str(Path(tmp) / "out"), "--image-size",
                                str(args.size), "--workers", "1"], env)
      print(f"| {os.path.getsize(tar) / 2**20:.0f} | {n} | {rss:.0f} | {secs:.0f} | "
            f"{n / secs:.0f} |", flush=True)


if __name__ == "__main__":
  main()

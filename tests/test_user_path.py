"""The path a new user walks, end to end, through the `jaxret` command:

real-format inputs (JPEG and PNG of mixed sizes and modes; a COCO captions_*.json with 5
captions per image for train; a Karpathy dataset_coco.json for val/test) -> `jaxret data
convert` of train and test into one data dir, with OpenAI's CLIP BPE (vocab.json +
merges.txt) -> a zoo config (configs/clip.py:b32, shrunk) trained with `--workdir gs://...`
on a local GCS server -> stopped and resumed -> `jaxret eval` on 2 devices (trained on 8, with
fsdp=2) -> `jaxret export` -> transformers' CLIPModel and processor reproduce jaxret's test
recall.
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from jaxret.data import sources, tokenizers
from test_tokenizer_kinds import load_open_clip

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30), "white": (245, 245, 245), "black": (10, 10, 10),
           "purple": (150, 40, 180), "orange": (250, 140, 20)}
SHAPES = ("square", "circle", "stripe", "cross")
# (size, mode, format): the mixture of files a real folder holds.
KINDS = [((96, 72), "RGB", "JPEG"), ((64, 100), "L", "JPEG"), ((120, 90), "RGBA", "PNG"),
         ((80, 80), "P", "PNG"), ((200, 150), "RGB", "PNG"), ((75, 110), "RGB", "JPEG")]
# A zoo-shaped config shrunk to seconds: the b32 recipe's towers, scan and remat, small.
TINY_CLIP = [
    "model.embed_dim=32", "model.image.size=64", "model.image.width=32", "model.image.depth=2",
    "model.image.num_heads=2", "model.image.mlp_dim=64", "model.text.width=32",
    "model.text.depth=2", "model.text.num_heads=2", "model.text.mlp_dim=64",
    "model.text.max_len=24", "model.dtype=float32",  # the parity below compares float32
    "batch_size=16", "log_every=1", "optim.warmup_steps=2", "optim.lr=3e-3",
    "checkpoint.every=2", "eval_every=0", "eval.batch_size=32", "mesh.fsdp=2",
    "eval.tasks=('retrieval',)",
]


def scene(rng, i):
  colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
  return colour, shape


def draw(colour, shape, size, seed):
  w, h = size
  rng = np.random.default_rng(seed)
  a = np.full((h, w, 3), 128, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
  ys, xs = np.mgrid[:h, :w]
  cy, cx, r = h / 2, w / 2, min(h, w) / 3
  mask = {"square": (abs(ys - cy) < r) & (abs(xs - cx) < r),
          "circle": (ys - cy) ** 2 + (xs - cx) ** 2 < r * r,
          "stripe": abs(ys - cy) < r / 3,
          "cross": (abs(ys - cy) < r / 4) | (abs(xs - cx) < r / 4)}[shape]
  a[mask] = COLOURS[colour]
  return a


def captions_for(colour, shape):
  # Raw web text: an HTML entity, odd spacing and case; jaxret and the export clean them.
  return [f"a {colour} {shape}", f"A {colour.upper()} {shape} &amp; a grey background",
          f"the {shape} is {colour}", f"{colour}   {shape} in the middle",
          f"a photo of a {colour} {shape}"]


def write_image(path, array, mode, fmt):
  im = Image.fromarray(array)
  im = im.convert(mode) if mode != "P" else im.convert("P", palette=Image.Palette.ADAPTIVE)
  im.save(path, fmt)


def build_inputs(root):
  """coco/train2014 + captions_train2014.json; coco/val2014 + dataset_coco.json (Karpathy)."""
  rng = np.random.default_rng(0)
  images, annotations, karpathy = [], [], []
  for split, folder, n in (("train", "train2014", 32), ("test", "val2014", 16)):
    os.makedirs(root / "coco" / folder)
    for i in range(n):
      colour, shape = scene(rng, i)
      size, mode, fmt = KINDS[i % len(KINDS)]
      name = f"COCO_{folder}_{i:012d}.{'jpg' if fmt == 'JPEG' else 'png'}"
      write_image(root / "coco" / folder / name, draw(colour, shape, size, i), mode, fmt)
      caps = captions_for(colour, shape)
      if split == "train":
        image_id = 1000 + i
        images.append({"license": 1, "file_name": name, "coco_url": "", "height": size[1],
                       "width": size[0], "date_captured": "", "flickr_url": "", "id": image_id})
        annotations += [{"image_id": image_id, "id": 10 * image_id + k, "caption": c}
                        for k, c in enumerate(caps)]
      else:
        karpathy.append({"filepath": folder, "sentids": list(range(5 * i, 5 * i + 5)),
                         "filename": name, "imgid": i, "split": "test" if i >= 4 else "val",
                         "sentences": [{"tokens": c.lower().split(), "raw": c, "imgid": i,
                                        "sentid": 5 * i + k} for k, c in enumerate(caps)],
                         "cocoid": 5000 + i})
  (root / "captions_train2014.json").write_text(json.dumps(
      {"info": {"description": "test"}, "licenses": [], "images": images,
       "annotations": annotations}))
  (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))


def jaxret(*args, devices=8):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, "-m", "jaxret.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (args[0], proc.stderr[-4000:])
  return proc


def recall(sim, owner, ks=(1, 5, 10)):
  """Multi-caption Recall@K by its definition: sim [images, captions], owner[c] = image."""
  i2t, t2i = {}, {}
  for k in ks:
    top = np.argsort(-sim, axis=1)[:, :k]
    i2t[f"R@{k}"] = float(np.mean([np.any(owner[top[i]] == i) for i in range(len(sim))]))
    top_t = np.argsort(-sim.T, axis=1)[:, :k]
    t2i[f"R@{k}"] = float(np.mean([owner[c] in top_t[c] for c in range(sim.shape[1])]))
  return i2t, t2i


def test_the_users_path(gcs_bucket, tmp_path):
  import torch
  import transformers
  build_inputs(tmp_path)
  clip_bpe = tmp_path / "openai-clip-bpe"
  tokenizers.write_clip_files(*tokenizers.read_openai_bpe(load_open_clip()[1]), clip_bpe)
  data = tmp_path / "data"
  common = ["--out", str(data), "--image-size", "64", "--workers", "1"]
  jaxret("data", "convert", "--images", str(tmp_path / "coco" / "train2014"), "--captions",
         str(tmp_path / "captions_train2014.json"), "--split", "train", "--tokenizer",
         str(clip_bpe), *common)
  jaxret("data", "convert", "--karpathy", str(tmp_path / "dataset_coco.json"), "--images",
         str(tmp_path / "coco"), *common)
  manifest = json.loads((data / "manifest.json").read_text())
  assert {s: manifest["splits"][s]["num_records"] for s in manifest["splits"]} == {
      "train": 32, "val": 4, "test": 12}

  workdir = f"{gcs_bucket}/user-path"
  train = ["train", "--config", "configs/clip.py:b32", "--workdir", workdir, "--no-progress",
           f"--config.data.dir={data}", *[f"--config.{o}" for o in TINY_CLIP]]
  jaxret(*train, "--config.total_steps=4")
  resumed = jaxret(*train, "--config.total_steps=8")
  assert f"resuming {workdir} from step 4" in resumed.stdout

  jaxret("eval", "--workdir", workdir, devices=2)
  from google.cloud import storage
  bucket = storage.Client().bucket(gcs_bucket[len("gs://"):])
  result = json.loads(bucket.blob("user-path/eval.json").download_as_bytes())
  assert result["step"] == 8 and result["num_images"] == 12 and result["num_captions"] == 60

  out = tmp_path / "hf"
  jaxret("export", "--workdir", workdir, "--out", str(out))
  model = transformers.CLIPModel.from_pretrained(out).eval()
  processor = transformers.AutoProcessor.from_pretrained(out)
  images, captions, owner = [], [], []
  src = sources.open_split(str(data), "test")
  for i in range(len(src)):
    record = sources.decode_record(src[i])
    images.append(Image.open(io.BytesIO(record["image"])).convert("RGB"))
    captions += record["captions"]
    owner += [i] * len(record["captions"])
  # The exported tokenizer gives jaxret's ids on cleaned text (README: Export to PyTorch).
  cleaned = [tokenizers.clean_text(c) for c in captions]
  inputs = processor(text=cleaned, images=images, padding="max_length", max_length=24,
                     truncation=True, return_tensors="pt")
  with torch.no_grad():
    out_ = model(**inputs)
  sim = (out_.image_embeds @ out_.text_embeds.T).numpy()
  i2t, t2i = recall(sim, np.asarray(owner))
  for k in ("R@1", "R@5", "R@10"):
    assert abs(i2t[k] - result["i2t"][k]) <= 0.005, (k, i2t, result["i2t"])
    assert abs(t2i[k] - result["t2i"][k]) <= 0.005, (k, t2i, result["t2i"])
  # It trained: each step logged once across the resume, the loss going down.
  rows = [json.loads(line) for line in
          bucket.blob("user-path/metrics.jsonl").download_as_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
  assert losses[-1] < losses[0], losses

"""README's "Train on your own data" recipes, run as README shows them: each `<!-- recipe: NAME
-->` block is read from README.md and its commands run in order, in a folder laid out as the
recipe says (COCO images + Karpathy's split file + a transformers CLIP folder; webdataset tars),
with the workdir on a local GCS server. Only sizes shrink: the tiny overrides are appended to
each `train` (later overrides win), and `--image-size 64 --workers 1` to each `data convert`.
"""
import glob
import io
import json
import os
import re
import shlex
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from jaxret import cli
from jaxret.data import tokenizers
from test_tokenizer_kinds import load_open_clip
from test_user_path import KINDS, TINY_CLIP, captions_for, draw, scene, write_image


def recipe(name):
  """The commands of README's `<!-- recipe: NAME -->` bash block, as argv lists."""
  text = open(os.path.join(ROOT, "README.md")).read()
  block = re.search(rf"<!-- recipe: {name} -->\n```bash\n(.*?)```", text, re.S)
  assert block, f"README has no recipe {name!r}"
  lines = block.group(1).replace("\\\n", " ").splitlines()
  return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


def run(argv, bucket):
  assert argv[0] == "jaxret", argv
  argv = [a.replace("gs://BUCKET", bucket) for a in argv[1:]]
  argv = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in argv]
  expanded = []
  for a in argv:  # the shell's glob expansion
    expanded += sorted(glob.glob(a)) if "*" in a else [a]
  if expanded[:2] == ["data", "convert"]:
    expanded += ["--image-size", "64", "--workers", "1"]
  if expanded[0] == "train":
    expanded += ["--no-progress", *[f"--config.{o}" for o in TINY_CLIP],
                 "--config.total_steps=3", "--config.optim.warmup_steps=1",
                 "--config.checkpoint.every=0"]
  cli.run(expanded)
  return expanded


def tiny_openai_clip(out):
  """A random CLIPModel with OpenAI's tokenizer files and image statistics, TINY_CLIP's shapes
  (ViT-B/32's patch), saved as transformers saves openai/clip-vit-base-patch32."""
  import transformers
  tokenizers.write_clip_files(*tokenizers.read_openai_bpe(load_open_clip()[1]), out)
  tok = transformers.CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=24,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=64, patch_size=32),
      projection_dim=32)
  transformers.CLIPModel(cfg).save_pretrained(out)
  transformers.CLIPProcessor(
      image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 64},
                                                      crop_size={"height": 64, "width": 64}),
      tokenizer=tok).save_pretrained(out)


def karpathy_layout(root):
  """coco/train2014 + coco/val2014 and a dataset_coco.json naming them train/restval/val/test."""
  entries = []
  for folder, n in (("train2014", 24), ("val2014", 12)):
    os.makedirs(root / "coco" / folder)
    for i in range(n):
      colour, shape = scene(None, i)
      size, mode, fmt = KINDS[i % len(KINDS)]
      name = f"COCO_{folder}_{i:012d}.{'jpg' if fmt == 'JPEG' else 'png'}"
      write_image(root / "coco" / folder / name, draw(colour, shape, size, i), mode, fmt)
      split = ("train" if i % 4 else "restval") if folder == "train2014" else \
          ("val" if i < 4 else "test")
      imgid = len(entries)
      entries.append({"filepath": folder, "filename": name, "imgid": imgid, "split": split,
                      "sentids": list(range(5 * imgid, 5 * imgid + 5)), "cocoid": imgid,
                      "sentences": [{"tokens": c.split(), "raw": c, "imgid": imgid,
                                     "sentid": 5 * imgid + k}
                                    for k, c in enumerate(captions_for(colour, shape))]})
  (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))


def webdataset_layout(root):
  """cc3m/train/00000{0,1}.tar and cc3m/val/000000.tar: key.jpg + key.txt members."""
  for split, shards, per in (("train", 2, 16), ("val", 1, 8)):
    os.makedirs(root / "cc3m" / split)
    for s in range(shards):
      with tarfile.open(root / "cc3m" / split / f"{s:06d}.tar", "w") as tar:
        for i in range(per):
          n = s * per + i
          colour, shape = scene(None, n)
          buf = io.BytesIO()
          Image.fromarray(draw(colour, shape, KINDS[n % len(KINDS)][0], n)).save(buf, "JPEG")
          for ext, data in (("jpg", buf.getvalue()),
                            ("txt", captions_for(colour, shape)[n % 5].encode())):
            info = tarfile.TarInfo(f"{n:08d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_karpathy_finetune_recipe(gcs_bucket, tmp_path, monkeypatch):
  import transformers
  karpathy_layout(tmp_path)
  tiny_openai_clip(tmp_path / "clip-vit-base-patch32")
  monkeypatch.chdir(tmp_path)
  commands = recipe("karpathy")
  assert [c[1] for c in commands] == ["data", "import-hf", "train", "eval", "export"]
  for argv in commands:
    run(argv, gcs_bucket + "/readme")
  manifest = json.loads((tmp_path / "data/coco/manifest.json").read_text())
  assert {s: v["num_records"] for s, v in manifest["splits"].items()} == {
      "train": 24, "val": 4, "test": 8}
  # The data's tokenizer is the CLIP folder's; the export's tokenizer gives its ids.
  exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export/coco-ft"))
  ours = tokenizers.load_tokenizer(str(tmp_path / "clip-vit-base-patch32"), 24)
  text = "A RED square &amp; a grey background"
  want = ours.encode_batch([text])[0].tolist()
  assert exported(tokenizers.clean_text(text), padding="max_length", max_length=24,
                  truncation=True)["input_ids"] == want
  from google.cloud import storage
  blob = storage.Client().bucket(gcs_bucket[len("gs://"):]).blob("readme/coco-ft/eval.json")
  result = json.loads(blob.download_as_bytes())
  assert result["num_images"] == 8 and result["num_captions"] == 40  # 5 per image


def test_webdataset_recipe(gcs_bucket, tmp_path, monkeypatch):
  webdataset_layout(tmp_path)
  monkeypatch.chdir(tmp_path)
  commands = recipe("webdataset")
  assert [c[1:3] for c in commands] == [["data", "convert"], ["data", "convert"],
                                        ["train", "--config"]]
  for argv in commands:
    run(argv, gcs_bucket + "/readme")
  manifest = json.loads((tmp_path / "data/cc3m/manifest.json").read_text())
  assert {s: v["num_records"] for s, v in manifest["splits"].items()} == {
      "train": 32, "test": 8}
  from google.cloud import storage
  blob = storage.Client().bucket(gcs_bucket[len("gs://"):]).blob("readme/cc3m-b16/eval.json")
  assert json.loads(blob.download_as_bytes())["step"] == 3

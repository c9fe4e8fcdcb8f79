"""Every `jaxret` command README.md and the config docstrings show is run here, as shown, in
document order (the demo config's first), in a folder laid out as the text assumes
(photos/ + captions.jsonl,
webdataset shards, a CLIP tokenizer folder, a TFDS coco_captions in ~/tensorflow_datasets, a
bucket on a local GCS server). Only sizes shrink: tiny model and step overrides are appended
to each `train` (later overrides win), `--image-size 64 --workers 1` to each `data
convert` and `--image-size 32` (the tiny trains' size) to `data teacher`; placeholders (BUCKET, DATA, HF_DIR, IMPORTED, the gcsfuse mount) name real folders.

Covered elsewhere, and checked here to be: README's recipe blocks (tests/test_readme_recipes.py),
launch-script commands (tests/test_launch.py), `jaxret inspect --config configs/clip.py:l14`
(tests/test_planner.py), `make demo` and `make test` (the demo and CI themselves).
"""
import ast
import glob
import io
import json
import os
import re
import shlex
import shutil
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from jaxret import cli
from jaxret.data import tokenizers
from test_tokenizer_kinds import load_open_clip

ELSEWHERE = {  # a shown command -> the test file that runs it, and words its text must hold
    "jaxret inspect --config configs/clip.py:l14": (
        "tests/test_planner.py", ('"inspect", "--config", "configs/clip.py:l14"',
                                  '"--mesh", "data=32,fsdp=8,tensor=1"')),
}
TINY_MODEL = [
    "model.embed_dim=32", "model.image.width=32", "model.image.depth=1",
    "model.image.num_heads=2", "model.image.mlp_dim=64", "model.text.width=32",
    "model.text.depth=1", "model.text.num_heads=2", "model.text.mlp_dim=64",
    "model.text.max_len=16", "model.dtype=float32", "batch_size=16", "total_steps=2",
    "optim.warmup_steps=1", "checkpoint.every=0", "eval_every=0", "log_every=1",
    "eval.batch_size=32", "eval.tasks=('retrieval',)", "mesh.data=-1", "mesh.fsdp=1",
    "mesh.tensor=1", "optim.grad_accum_steps=1",
]


def shown_commands():
  """(where, command) of each `jaxret ...` line in README code blocks outside the recipe
  blocks, then in configs/*.py docstrings; continuations joined, [optional] parts dropped."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  readme = re.sub(r"<!-- recipe: \w+ -->\n```bash\n.*?```", "", readme, flags=re.S)
  texts = [("README.md", b) for b in re.findall(r"```[a-z]*\n(.*?)```", readme, re.S)]
  # The demo config's docstring first: README's later commands read the runs it makes.
  paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")),
                 key=lambda p: (not p.endswith("demo.py"), p))
  docs = [(os.path.relpath(p, ROOT), ast.get_docstring(ast.parse(open(p).read()))) for p in paths]
  texts = docs[:1] + texts + docs[1:]
  out = []
  for where, text in texts:
    for line in (text or "").replace("\\\n", " ").splitlines():
      line = re.sub(r"\s+#.*$", "", line.strip())
      if line.startswith("jaxret "):
        out.append((where, " ".join(re.sub(r"\s*\[[^\]]*\]", "", line).split())))
  return out


def layout(root, demo_dir):
  """What the shown commands expect to find in the current folder."""
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(root / "scene.png")
  (root / "photos").mkdir()
  rows = []
  for i in range(12):
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), np.uint8)).save(root / "photos" / f"{i}.jpg")
    rows.append({"image": f"{i}.jpg", "captions": [f"photo {i}", f"picture number {i}"]})
  (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "captions.txt").write_text("".join(f"a caption about thing {i}\n" for i in range(300)))
  (root / "shards").mkdir()
  with tarfile.open(root / "shards" / "000000.tar", "w") as tar:
    for i in range(12):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (70, 90, 3), np.uint8)).save(buf, "JPEG")
      for name, data in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", f"shard {i}".encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  tokenizers.write_clip_files(*tokenizers.read_openai_bpe(load_open_clip()[1]),
                              root / "clip_tokenizer")
  coco_captions(root / "home" / "tensorflow_datasets")


def coco_captions(data_dir):
  """A tiny TFDS `coco_captions` with the real one's image and captions/text features."""
  import tensorflow_datasets as tfds

  class CocoCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(1)
      for i in range(6):
        buf = io.BytesIO()  # encoded: TFDS encodes arrays with TensorFlow, not installed
        Image.fromarray(rng.integers(0, 255, (72, 64, 3), np.uint8)).save(buf, "PNG")
        yield i, {"image": buf.getvalue(),
                  "captions": {"text": [f"coco {i}", f"another {i}"]}}

  CocoCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def prepare(argv, ctx):
  """A shown command -> the argv run here (placeholders, globs, tiny sizes)."""
  words = []
  for w in argv[1:]:
    if w == "...":
      continue
    for old, new in ctx["names"].items():
      w = w.replace(old, new)
    w = os.path.expanduser(w)
    words += sorted(glob.glob(w)) if "*" in w else [w]
  if words[0] == "train":
    config = words[words.index("--config") + 1]
    patch = {"b32": 32, "b16": 16, "l14": 14}.get(config.rpartition(":")[2], 16)
    words += ["--no-progress", *[f"--config.{o}" for o in TINY_MODEL],
              f"--config.model.image.size={2 * patch}"]
    if not any(w.startswith("--config.data.dir=") for w in words):
      words.append("--config.data.dir=demo_data")
  if words[:2] == ["data", "convert"]:
    words += ["--image-size", "64", "--workers", "1"]
  if words[:2] == ["data", "demo"]:
    words += ["--num-train", "64", "--num-test", "16"]
  if words[:2] == ["data", "teacher"]:  # views at the size the tiny trains use (patch 16)
    words += ["--image-size", "32", "--no-progress"]
  if words[:2] == ["data", "train-tokenizer"]:
    words += ["--vocab-size", "600" if "sentencepiece" not in words else "100"]
  return [os.path.join(ROOT, w) if w.startswith("configs/") else w for w in words]


def _workdir(argv):
  return argv[argv.index("--workdir") + 1]


def _run_config(argv):
  """The config a `train` argv runs (a shown command's overrides may differ from another's
  and still give the same run once the tiny sizes are appended)."""
  from jaxret.experiment import load_config
  rest, overrides = cli._split_overrides(argv)
  return load_config(rest[rest.index("--config") + 1], overrides).to_json()


def test_every_shown_command_runs(gcs_bucket, demo_dir, tmp_path, monkeypatch):
  import transformers
  layout(tmp_path, demo_dir)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  # The gcsfuse mount the zoo docstrings read from holds converted data (here: the demo's).
  mount = tmp_path / "mnt"
  mount.mkdir()
  os.symlink(tmp_path / "demo_data", mount / "records")  # built by the first shown command
  ctx = {"names": {"gs://BUCKET": gcs_bucket + "/docs", "/mnt/data/records": str(mount / "records"),
                   "/path/to/converted/records": str(mount / "records"),
                   "HF_DIR": "export/filip", "IMPORTED": "imported/lit",
                   "DATA/tokenizer.json": "demo_data/tokenizer.json", "=DATA": "=demo_data"}}
  commands = shown_commands()
  assert len(commands) >= 20, commands
  ran, trained, seen = [], {}, set()
  for where, line in commands:
    covered = [k for k in ELSEWHERE if line.startswith(k)]
    if covered:
      path, words = ELSEWHERE[covered[0]]
      text = open(os.path.join(ROOT, path)).read()
      assert all(w in text for w in words), (line, path)
      continue
    if line in seen:  # shown twice (README and a config docstring): run once
      continue
    seen.add(line)
    argv = prepare(shlex.split(line), ctx)
    # A run shown twice under other workdirs (the demo's filip run, in README and in
    # configs/demo.py) trains once; the second workdir is a copy, read by what follows.
    key = _run_config(argv) if argv[0] == "train" else None
    if key in trained:
      shutil.copytree(trained[key], _workdir(argv))
      continue
    t0 = time.perf_counter()
    try:
      cli.run(argv)
    except Exception as e:
      raise AssertionError(f"{where}: `{line}` failed as {argv}: {e}") from e
    print(f"{time.perf_counter() - t0:6.1f} s  {line}")
    if argv[0] == "train":
      trained[key] = _workdir(argv)
    ran.append(argv[0] if argv[0] != "data" else "data " + argv[1])
  # Every subcommand the docs show, at least once.
  assert {"data demo", "data convert", "data train-tokenizer", "train", "eval", "inspect",
          "export", "import-hf"} <= set(ran), ran
  assert transformers.AutoTokenizer.from_pretrained("export/filip")

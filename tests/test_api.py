"""`jaxret.load`: a workdir, its `jaxret export` folder and that folder's `jaxret import-hf`
copy embed like the independent references: the evaluator's embeddings of the demo test split,
and transformers' CLIPModel on the same inputs. Also runs the README's "Python API" example and
the search commands of `make demo` on a tiny trained run.
"""
import io
import os
import re
import shlex

import numpy as np
import pytest
from PIL import Image

import jaxret
from jaxret import cli
from jaxret.data import sources
from jaxret.errors import UserError
from jaxret.inference.search import search_queries, search_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tiny_config, tmp_path_factory):
  """One tiny softmax run (CLIP towers, so it exports as CLIPModel), trained once."""
  from jaxret.train.loop import train
  workdir = str(tmp_path_factory.mktemp("api") / "run")
  cfg = tiny_config("softmax")
  train(cfg, workdir, progress=False)
  return cfg, workdir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("api_export") / "hf")
  cli.main(["export", "--workdir", run[1], "--out", out])
  return out


@pytest.fixture(scope="module")
def records(run):
  """The demo test split as PIL images (decoded from the stored PNGs) and captions."""
  cfg = run[0]
  src = sources.open_split(cfg.data.dir, "test")
  recs = [sources.decode_record(src[i]) for i in range(len(src))]
  return [Image.open(io.BytesIO(r["image"])) for r in recs], [r["captions"] for r in recs]


@pytest.fixture(scope="module")
def reference(run):
  """The evaluation path's embeddings of the test split."""
  from jaxret.eval.suite import build_evaluator
  from jaxret.experiment import Experiment
  from jaxret.workdir import load_run_config, restore_params
  workdir = run[1]
  exp = Experiment(load_run_config(workdir))
  params, _ = restore_params(exp.abstract_state, workdir)
  return exp.cfg, build_evaluator(exp).embed_records(params, "test")


@pytest.fixture(scope="module")
def model(run):
  return jaxret.load(run[1])


def _close(got, want, tol):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  err = float(np.abs(got - want).max())
  assert err < tol, f"max abs error {err:.2e}"


def test_workdir_embeds_like_the_evaluator(model, records, reference):
  cfg, emb = reference
  images, captions = records
  m = cfg.eval.captions_per_image or None
  texts = [c for cs in captions for c in cs[:m]]
  _close(model.encode_images(images), emb["image"]["image_emb"], 1e-5)
  _close(model.encode_texts(texts), emb["text"]["text_emb"], 1e-5)


def test_image_forms_and_sizes(model, records, reference, tmp_path):
  """Arrays, paths and other sizes go through the same evaluation view."""
  from jaxret.data.augment import resize_center_crop
  images = [np.asarray(im.convert("RGB")) for im in records[0][:5]]
  want = reference[1]["image"]["image_emb"][:5]
  _close(model.encode_images(np.stack(images)), want, 1e-5)
  paths = []
  for i, im in enumerate(images):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(im).save(paths[-1])
  _close(model.encode_images(paths), want, 1e-5)
  # A 100x150 image: the view is the bicubic resize of the shorter side + center crop.
  big = np.asarray(Image.fromarray(images[0]).resize((150, 100), Image.BICUBIC))
  view = resize_center_crop(big, model.image_size)
  assert model.preprocess(big).shape == (model.image_size,) * 2 + (3,)
  _close(model.encode_images([big]), model.encode_images([view]), 1e-6)


def test_export_embeds_like_transformers(exported, records):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  images = [im.convert("RGB") for im in records[0][:6]]
  texts = [cs[0] for cs in records[1][:6]]
  pt = transformers.CLIPModel.from_pretrained(exported).eval()
  proc = transformers.AutoProcessor.from_pretrained(exported)
  inputs = proc(text=texts, images=images, padding=True, return_tensors="pt")
  with torch.no_grad():
    out = pt(**inputs)
  model = jaxret.load(exported)
  img, txt = model.encode_images(images), model.encode_texts(texts)
  _close(img, out.image_embeds.numpy(), 1e-4)
  _close(txt, out.text_embeds.numpy(), 1e-4)
  _close(model.similarity(img, txt), out.logits_per_image.numpy(), 1e-3)


def test_import_hf_folder_embeds_like_the_workdir(exported, model, records, tmp_path):
  folder = str(tmp_path / "imported")
  cli.main(["import-hf", exported, "--out", folder])
  imported = jaxret.load(folder)
  images, texts = records[0][:8], [cs[0] for cs in records[1][:8]]
  _close(imported.encode_images(images), model.encode_images(images), 1e-5)
  _close(imported.encode_texts(texts), model.encode_texts(texts), 1e-5)


def test_similarity_is_scaled_cosine(model):
  a = model.encode_texts(["a red bag"])
  s = model.similarity(a, a)
  assert model.bias is None
  np.testing.assert_allclose(s, [[model.scale]], rtol=1e-5)


def test_readme_example_runs(run, records, tmp_path, monkeypatch, capsys):
  """The README's Python API example, verbatim except for the workdir path."""
  text = open(os.path.join(ROOT, "README.md")).read()
  section = text.split("## Python API", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert "runs/demo-softmax" in code and "scene.png" in code
  monkeypatch.chdir(tmp_path)
  records[0][0].save("scene.png")
  exec(code.replace("runs/demo-softmax", run[1]), {})
  assert capsys.readouterr().out.strip()


def test_bad_paths_are_one_line_errors(run, exported, tmp_path):
  with pytest.raises(UserError, match="not found"):
    jaxret.load(str(tmp_path / "nope"))
  with pytest.raises(UserError, match="not a jaxret model"):
    jaxret.load(str(tmp_path))
  with pytest.raises(UserError, match="steps belong to workdirs"):
    jaxret.load(exported, step=2)
  with pytest.raises(UserError, match="no checkpoint at step 3"):
    jaxret.load(run[1], step=3)


def test_make_demo_search_commands(run, tmp_path):
  """The commands `make demo` ends with, with its DEMO_QUERIES, on the tiny run."""
  from jaxret.inference.contact_sheet import sheet_size
  make = open(os.path.join(ROOT, "Makefile")).read()
  queries = shlex.split(re.search(r"^DEMO_QUERIES := (.*)$", make, re.M).group(1))
  k = int(re.search(r"jaxret search .*--k (\d+)", make).group(1))
  assert len(queries) == 3 and "--show $(DEMO_RUNS)/search.png" in make
  cfg, workdir = run
  store = str(tmp_path / "demo-softmax-test-store")
  cli.main(["embed", "--model", workdir, "--data", cfg.data.dir, "--split", "test",
            "--out", store, "--no-progress"])
  # One call with every query, as make demo runs it: the same top-k as one call per query.
  cli.main(["search", "--index", store, "--k", str(k), *queries,
            "--show", str(tmp_path / "search.png")])
  model = jaxret.load(workdir)
  for n, q in enumerate(queries, 1):
    assert Image.open(tmp_path / f"search-{n}.png").size == sheet_size(k)
    alone = search_store(store, q, k=k, show=str(tmp_path / f"alone-{n}.png"), quiet=True)
    together = search_queries(store, [q, queries[0]], k=k, quiet=True, model=model)[0]
    assert [r["id"] for r in alone] == [r["id"] for r in together]
    assert (np.asarray(Image.open(tmp_path / f"alone-{n}.png"))
            == np.asarray(Image.open(tmp_path / f"search-{n}.png"))).all()

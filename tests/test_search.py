"""`jaxret embed` and `jaxret search` on a tiny FILIP run: exact top-k against numpy brute
force, the FILIP rerank against a numpy late-interaction reference, resuming an interrupted
embed, the contact sheet, and the one-line errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import jaxret
from jaxret import cli
from jaxret.data import sources
from jaxret.errors import UserError
from jaxret.inference import contact_sheet, store as store_mod
from jaxret.inference.embed import embed_to_store
from jaxret.inference.search import search_store

SHARD = 16  # the 64 test records make 4 shards


@pytest.fixture(scope="module")
def run(tiny_config, tmp_path_factory):
  from jaxret.train.loop import train
  workdir = str(tmp_path_factory.mktemp("search") / "run")
  cfg = tiny_config("filip")
  train(cfg, workdir, progress=False)
  return cfg, workdir


@pytest.fixture(scope="module")
def model(run):
  return jaxret.load(run[1])


@pytest.fixture(scope="module")
def store(run, tmp_path_factory):
  cfg, workdir = run
  out = str(tmp_path_factory.mktemp("stores") / "test")
  cli.main(["embed", "--model", workdir, "--data", cfg.data.dir, "--split", "test", "--out", out,
            "--tokens", "--shard-size", str(SHARD), "--no-progress"])
  return out


def _read(path):
  """The store's files read directly (not through jaxret's Store)."""
  meta = json.load(open(os.path.join(path, "store.json")))
  parts = {w: [] for w in ("emb", "tokens", "mask")}
  ids = []
  for i in range(meta["num_shards"]):
    for w in parts:
      f = os.path.join(path, f"{w}-{i:05d}.npy")
      if os.path.exists(f):
        parts[w].append(np.load(f))
    ids += json.load(open(os.path.join(path, f"ids-{i:05d}.json")))
  return meta, ids, {w: np.concatenate(v) for w, v in parts.items() if v}


def _brute_force(query, emb, k):
  s = query.astype(np.float32) @ emb.astype(np.float32).T
  order = np.argsort(-s, kind="stable")[:k]
  return order, s[order]


def test_store_holds_the_evaluators_embeddings(run, store):
  from jaxret.eval.suite import build_evaluator
  from jaxret.experiment import Experiment
  from jaxret.workdir import load_run_config, restore_params
  exp = Experiment(load_run_config(run[1]))
  params, _ = restore_params(exp.abstract_state, run[1])
  want = build_evaluator(exp).embed_records(params, "test")["image"]
  meta, ids, arrays = _read(store)
  assert meta["complete"] and meta["count"] == 64 and meta["kind"] == "image"
  assert ids == list(range(64)) and arrays["emb"].dtype == np.float16
  np.testing.assert_allclose(arrays["emb"], want["image_emb"], atol=1e-3)  # float16 rounding
  np.testing.assert_allclose(arrays["tokens"], want["image_tokens"], atol=1e-3)
  np.testing.assert_array_equal(arrays["mask"], want["image_mask"])


def test_text_query_is_exact(model, store, capsys):
  _, ids, arrays = _read(store)
  k = 10
  got = search_store(store, "a red bag in the top left", k=k, model=model)
  order, scores = _brute_force(model.encode_texts(["a red bag in the top left"])[0],
                               arrays["emb"], k)
  assert [r["id"] for r in got] == [ids[i] for i in order]
  np.testing.assert_allclose([r["score"] for r in got], scores, atol=1e-5)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == k and lines[0].split()[0] == "1" and lines[0].endswith(f"record {ids[order[0]]}")


def test_image_query_is_exact(run, model, store, tmp_path):
  _, ids, arrays = _read(store)
  raw = sources.decode_record(sources.open_split(run[0].data.dir, "test")[5])["image"]
  path = tmp_path / "q.png"
  path.write_bytes(raw)
  got = search_store(store, image=str(path), k=64, model=model, quiet=True)  # every item
  order, scores = _brute_force(model.encode_images([str(path)])[0], arrays["emb"], 64)
  assert [r["id"] for r in got] == [ids[i] for i in order]
  np.testing.assert_allclose([r["score"] for r in got], scores, atol=1e-5)
  assert got[0]["id"] == 5  # the image itself


def _late_interaction(q_tok, q_mask, c_tok, c_mask):
  """Numpy FILIP score: mean over the query's valid tokens of the max over the candidate's."""
  out = []
  for t, m in zip(c_tok.astype(np.float32), c_mask):
    sim = q_tok[q_mask].astype(np.float32) @ t[m].T
    out.append(sim.max(axis=1).mean())
  return np.array(out)


def test_rerank_orders_candidates_by_late_interaction(model, store):
  _, ids, arrays = _read(store)
  query, k, c = "a blue shirt to the left of a red bag", 5, 20
  got = search_store(store, query, k=k, model=model, rerank_=True, candidates=c, quiet=True)
  q = model.encode_texts([query], tokens=True)
  cand, _ = _brute_force(q["emb"][0], arrays["emb"], c)
  late = _late_interaction(q["tokens"][0], q["mask"][0], arrays["tokens"][cand], arrays["mask"][cand])
  best = np.argsort(-late, kind="stable")[:k]
  assert [r["id"] for r in got] == [ids[cand[i]] for i in best]
  np.testing.assert_allclose([r["score"] for r in got], late[best], atol=1e-5)


def test_interrupted_embed_resumes_to_the_same_store(run, model, store, tmp_path):
  data = run[0].data.dir
  out = str(tmp_path / "partial")
  meta = embed_to_store(None, out, data=data, tokens=True, shard_size=SHARD, model=model,
                        progress=False, max_shards=2)
  assert not meta["complete"]
  with pytest.raises(UserError, match="incomplete"):
    search_store(out, "a red bag", model=model)
  # A shard cut off mid-write leaves only temp files and no ids: it is redone.
  os.remove(os.path.join(out, "ids-00001.json"))
  open(os.path.join(out, "emb-00002.npy.tmp"), "w").write("torn")
  meta = embed_to_store(None, out, data=data, tokens=True, shard_size=SHARD, model=model,
                        progress=False)
  assert meta["complete"] and meta["count"] == 64
  _, ids_a, a = _read(out)
  _, ids_b, b = _read(store)
  assert ids_a == ids_b == sorted(set(ids_a))  # no duplicates, none missing
  for w in ("emb", "tokens", "mask"):
    np.testing.assert_array_equal(a[w], b[w])
  # A second rerun of a complete store embeds nothing and changes nothing.
  before = os.path.getmtime(os.path.join(out, "emb-00000.npy"))
  embed_to_store(None, out, data=data, tokens=True, shard_size=SHARD, model=model, progress=False)
  assert os.path.getmtime(os.path.join(out, "emb-00000.npy")) == before
  with pytest.raises(UserError, match="shard_size"):
    embed_to_store(None, out, data=data, tokens=True, shard_size=8, model=model, progress=False)


def test_contact_sheet(store, model, tmp_path):
  png = str(tmp_path / "sheet.png")
  cli.main(["search", "--index", store, "--k", "6", "a green coat", "--show", png])
  assert Image.open(png).size == ((6 + 1) * contact_sheet.TILE, contact_sheet.TILE + contact_sheet.LABEL)


def test_folder_and_caption_stores(run, model, tmp_path):
  """--images (any sizes, nested) and --captions stores; --image queries against both."""
  src = sources.open_split(run[0].data.dir, "test")
  folder = tmp_path / "photos"
  (folder / "sub").mkdir(parents=True)
  for i in range(6):
    raw = sources.decode_record(src[i])["image"]
    im = Image.open(__import__("io").BytesIO(raw)).resize((64 + 10 * i, 80))
    im.save(folder / ("sub" if i % 2 else "") / f"{i}.png")
  (folder / "notes.txt").write_text("not an image")
  images = str(tmp_path / "img_store")
  cli.main(["embed", "--model", run[1], "--images", str(folder), "--out", images, "--tokens",
            "--shard-size", "4", "--no-progress"])
  _, ids, arrays = _read(images)
  assert ids == ["0.png", "2.png", "4.png", "sub/1.png", "sub/3.png", "sub/5.png"]
  query = str(folder / "sub" / "3.png")
  got = search_store(images, image=query, k=3, model=model, quiet=True)
  order, scores = _brute_force(model.encode_images([query])[0], arrays["emb"], 3)
  assert [r["id"] for r in got] == [ids[i] for i in order] and got[0]["id"] == "sub/3.png"
  png = str(tmp_path / "img.png")
  search_store(images, image=query, k=3, model=model, quiet=True, rerank_=True, show=png)
  assert Image.open(png).size == contact_sheet.sheet_size(3)

  caps = tmp_path / "captions.txt"
  caps.write_text("a red bag\n\na white coat above a green shirt\na blue sneaker\n")
  texts = str(tmp_path / "txt_store")
  cli.main(["embed", "--model", run[1], "--captions", str(caps), "--out", texts, "--no-progress"])
  _, ids, arrays = _read(texts)
  assert [i["line"] for i in ids] == [1, 3, 4]
  got = search_store(texts, image=query, k=3, model=model, quiet=True)
  order, scores = _brute_force(model.encode_images([query])[0], arrays["emb"], 3)
  assert [r["id"] for r in got] == [ids[i] for i in order]
  np.testing.assert_allclose([r["score"] for r in got], scores, atol=1e-5)


def _cli_error(argv, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("jaxret: error: ") and "\n" not in err, err
  return err


def test_bad_input_is_one_line_errors(run, store, tmp_path, capsys):
  assert "not an embedding store" in _cli_error(
      ["search", "--index", str(tmp_path / "none"), "a red bag"], capsys)
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "holds no images" in _cli_error(
      ["embed", "--model", run[1], "--images", str(empty), "--out", str(tmp_path / "s")], capsys)
  # Stores written with the store's own functions: another model's dimension, no tokens.
  def fake(name, dim):
    path = str(tmp_path / name)
    store_mod.begin(path, {"model": run[1], "step": None, "kind": "image", "source": {},
                           "dim": dim, "shard_size": 2, "num_shards": 1, "tokens": False})
    store_mod.write_shard(path, 0, ["a", "b"], np.eye(2, dim))
    store_mod.finish(path, store_mod.read_meta(path))
    return path
  err = _cli_error(["search", "--index", fake("dim7", 7), "a red bag"], capsys)
  assert "embeds in 32 dimensions" in err and "holds 7" in err
  assert "token embeddings" in _cli_error(
      ["search", "--index", fake("dim32", 32), "x", "--rerank"], capsys)


def test_inference_never_reaches_the_training_loop():
  import test_layers
  g = test_layers.graph()
  seen, todo = set(), [m for m in g if m.startswith("jaxret.inference")]
  while todo:
    for dep in g[todo.pop()] - seen:
      seen.add(dep)
      todo.append(dep)
  assert not [m for m in seen if m.startswith("jaxret.train")]

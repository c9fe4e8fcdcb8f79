"""Compositional evaluation (eval task "compositional"): the accuracy held to hand-worked and
loop references, the evaluator held to a reference built from its own embeddings (pooled and
FILIP), and the task end to end: training metrics, eval.json, tables, plots, the skip line."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxret.data import caption_swaps
from jaxret.eval import compositional
from jaxret.eval.compositional import accuracy, candidates, pair_scores

TYPES = ("attribute", "object", "relation")


def unit(*v):
  v = np.asarray(v, np.float32)
  return v / np.linalg.norm(v)


# --- the numbers, by hand ------------------------------------------------------------------


def test_accuracy_by_hand():
  """Three images; image 2 has no variants. Scores are dot products of 2-d unit vectors:
  image 0 vs its true caption 1.0, vs its attribute variant 0.6 (win) and its object variant
  1.0 (a tie: a loss); image 1 vs its true 0.8, attribute variants 1.0 (loss) and 0.0 (win),
  relation variant 0.8 (tie: loss)."""
  images = {"image_emb": np.stack([unit(1, 0), unit(0, 1), unit(1, 0)])}
  true = [unit(1, 0), unit(0.6, 0.8), unit(0, 1)]
  variants = [(1, 0, unit(0, 1)), (0, 0, unit(0.6, 0.8)), (1, 2, unit(0.6, 0.8)),
              (0, 1, unit(1, 0)), (1, 0, unit(1, 0))]  # (image, type, embedding), any order
  image = np.array([v[0] for v in variants])
  kind = np.array([v[1] for v in variants])
  gallery = {"text_emb": np.stack(true + [v[2] for v in variants])}
  rows, kinds = candidates(image, kind, 3)
  assert rows.shape == (3, 4) and (rows[:, 0] == [0, 1, 2]).all()
  got = accuracy(pair_scores(images, gallery, rows), kinds)
  assert got["attribute"] == {"accuracy": pytest.approx(2 / 3), "chance": 0.5, "images": 2,
                              "pairs": 3, "no_variants": 1}
  assert got["object"] == {"accuracy": 0.0, "chance": 0.5, "images": 1, "pairs": 1,
                           "no_variants": 2}
  assert got["relation"] == {"accuracy": 0.0, "chance": 0.5, "images": 1, "pairs": 1,
                             "no_variants": 2}
  assert got["mean"] == pytest.approx((2 / 3 + 0 + 0) / 3)
  none = accuracy(np.zeros((2, 1)), np.zeros((2, 0), np.int64))
  assert none["relation"]["accuracy"] is None and none["mean"] is None


def late_score(image_tokens, image_mask, text_tokens, text_mask):
  """FILIP's s^I for one pair, as the paper writes it: mean over the image's tokens of the best
  dot product with a caption token (padding in neither)."""
  sim = image_tokens[image_mask] @ text_tokens[text_mask].T
  return sim.max(axis=1).mean()


def loop_accuracy(score, true_of, variants):
  """score(image, caption) and per-type (wins, pairs, images) one pair at a time."""
  out = {}
  for t in TYPES:
    pairs = [(i, c) for i, kind, c in variants if kind == t]
    wins = sum(score(i, c) < score(i, true_of[i]) for i, c in pairs)
    out[t] = (wins, len(pairs), len({i for i, _ in pairs}))
  return out


def check(result, reference, num_images):
  for t in TYPES:
    wins, pairs, images = reference[t]
    r = result[t]
    assert (r["pairs"], r["images"], r["no_variants"]) == (pairs, images, num_images - images)
    assert r["accuracy"] == (pytest.approx(wins / pairs) if pairs else None)
    assert r["chance"] == 0.5


@pytest.mark.parametrize("late", [False, True])
def test_pair_scores_match_a_loop_reference(late):
  rng = np.random.default_rng(0)
  n, v, d = 7, 19, 6
  image = rng.integers(0, n - 1, v)  # the last image gets no variant
  kind = rng.integers(0, 3, v)
  emb = lambda *shape: rng.normal(size=shape).astype(np.float32)
  images = {"image_emb": emb(n, d), "image_tokens": emb(n, 5, d),
            "image_mask": rng.random((n, 5)) < 0.7}
  gallery = {"text_emb": emb(n + v, d), "text_tokens": emb(n + v, 4, d),
             "text_mask": rng.random((n + v, 4)) < 0.7}
  images["image_mask"][:, 0] = gallery["text_mask"][:, 0] = True  # never an empty side
  rows, kinds = candidates(image, kind, n)
  got = accuracy(pair_scores(images, gallery, rows, late=late, block=3), kinds)
  if late:
    score = lambda i, c: late_score(images["image_tokens"][i], images["image_mask"][i],
                                    gallery["text_tokens"][c], gallery["text_mask"][c])
  else:
    score = lambda i, c: images["image_emb"][i] @ gallery["text_emb"][c]
  variants = [(int(i), TYPES[k], n + j) for j, (i, k) in enumerate(zip(image, kind))]
  check(got, loop_accuracy(score, list(range(n)), variants), n)


def test_plan_drops_variants_cut_off_by_the_text_length():
  """A 3-token encoder: "a red cat on a mat" and its relation variant "a red cat under a mat"
  read the same, so that pair is dropped; the colour change is within the 3 tokens."""
  vocab = {}

  def encode(texts):
    return np.array([[vocab.setdefault(w, len(vocab)) for w in (t.split() + ["<pad>"] * 3)[:3]]
                     for t in texts])

  p = compositional.plan([("a red cat on a mat", {}), ("nothing here", {})], encode)
  assert p.num_images == 2 and set(p.image) == {0}
  assert {TYPES[k] for k in p.kind} == {"attribute", "object"}
  assert (p.kind == 0).sum() == compositional.MAX_PER_TYPE


# --- the evaluator ---------------------------------------------------------------------------


def random_evaluator(cfg):
  """(evaluator, randomly initialised params) of a config: no training needed to hold the
  evaluator to a reference on its own embeddings."""
  from jaxret.eval.suite import build_evaluator
  from jaxret.experiment import Experiment, init_state
  exp = Experiment(cfg)
  params = init_state(exp.model, exp.tx, exp.mesh, cfg.model.image.size, 0, exp.state_sh).params
  return build_evaluator(exp), params


def reference(ev, params, split, data_dir, classes=None):
  """Per-type (wins, pairs, images) from the evaluator's embeddings of the split and of each
  image's variants (caption_swaps, seeded per image as documented), scored pair by pair."""
  emb = ev.embed_records(params, split, data_dir=data_dir, records=True)
  owner = list(emb["caption_image"])
  true_of = [owner.index(i) for i in range(len(emb["records"]))]
  variants = []
  for i, (caption, meta) in enumerate(emb["records"]):
    swaps = caption_swaps.swaps_for_record(meta, caption, compositional.MAX_PER_TYPE,
                                           np.random.default_rng(i), classes=classes)
    variants += [(i, t, c) for t in TYPES for c in swaps[t]]
  if not variants:
    return {t: (0, 0, 0) for t in TYPES}
  text = ev.embed(params, "text", ev.tokenizer.encode_batch([c for _, _, c in variants]))
  t0 = len(owner)
  variants = [(i, t, t0 + j) for j, (i, t, _) in enumerate(variants)]
  img = emb["image"]
  if ev.late:
    tokens = np.concatenate([emb["text"]["text_tokens"], text["text_tokens"]])
    mask = np.concatenate([emb["text"]["text_mask"], text["text_mask"]])
    score = lambda i, c: late_score(img["image_tokens"][i], img["image_mask"][i], tokens[c],
                                    mask[c])
  else:
    pooled = np.concatenate([emb["text"]["text_emb"], text["text_emb"]])
    score = lambda i, c: img["image_emb"][i] @ pooled[c]
  return loop_accuracy(score, true_of, variants)


def test_filip_scores_by_late_interaction_on_the_demo(tiny_config, demo_dir):
  from jaxret.data.sources import load_manifest
  cfg = tiny_config("filip", "eval.tasks=('compositional',)")
  ev, params = random_evaluator(cfg)
  assert ev.late
  result = ev(params, 0)
  assert result["tasks"] == ["compositional"] and "skipped" not in result
  comp = result["compositional"]
  # Every demo scene has 12+ colour and 16+ class replacements, a position exchange and 4 moves:
  # 4 variants of each type (MAX_PER_TYPE).
  assert [(comp[t]["images"], comp[t]["pairs"]) for t in TYPES] == [(64, 256), (64, 256), (64, 256)]
  classes = load_manifest(demo_dir)["classes"]
  check(comp, reference(ev, params, "test", demo_dir, classes), 64)
  assert comp["mean"] == pytest.approx(np.mean([comp[t]["accuracy"] for t in TYPES]))


# --- converted data: rule swaps, and the skip line -------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """Two converted image folders: 'words' (8 images, the even ones captioned with a colour, an
  animal and a position, the odd ones with none of the words lists' words) and 'plain' (no
  caption has such a word). -> {name: data dir}."""
  from jaxret.data import convert
  root = tmp_path_factory.mktemp("compositional")
  rng = np.random.default_rng(0)
  letters = "bcdefghj"
  plain = [f"a quiet snapshot of scene {x}" for x in letters]
  looks = {0: "red cat", 2: "blue dog", 4: "green horse", 6: "white bird"}
  captions = {"words": [f"a {looks[i]} on the left" if i in looks else plain[i] for i in range(8)],
              "plain": plain}
  out = {}
  for name, caps in captions.items():
    (root / name / "img").mkdir(parents=True)
    rows = []
    for i, caption in enumerate(caps):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(buf, "PNG")
      (root / name / "img" / f"{i}.png").write_bytes(buf.getvalue())
      rows.append({"image": f"{i}.png", "captions": [caption, f"another view {letters[i]}"]})
    (root / name / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out[name] = str(root / name / "data")
    convert.convert(out[name], split="train", images=root / name / "img",
                    captions=root / name / "caps.jsonl", image_size=64, vocab_size=700,
                    workers=1, progress=False)
  return out


def test_converted_data_uses_rule_swaps_and_skips_without_words(tiny_config, converted, capsys):
  words, plain = converted["words"], converted["plain"]
  cfg = tiny_config("softmax", f"data.dir={words}", "data.eval_split=train",
                    "eval.tasks=('retrieval','compositional')",
                    f"eval.sets=('words=:train', 'plain={plain}:train')")
  ev, params = random_evaluator(cfg)
  result = ev(params, 0)
  ev(params, 1)  # a second evaluation does not repeat the skip line
  printed = capsys.readouterr().out
  comp = result["sets"]["words"]["compositional"]
  # Four captions with words: each has 4+ colour and animal replacements, and "on" and "left"
  # each turned into their opposites.
  assert [(comp[t]["images"], comp[t]["pairs"], comp[t]["no_variants"]) for t in TYPES] == [
      (4, 16, 4), (4, 16, 4), (4, 8, 4)]
  check(comp, reference(ev, params, "train", words), 8)
  skipped = result["sets"]["plain"]
  assert "compositional" not in skipped and "i2t" in skipped  # retrieval still runs
  why = (f"no caption of data '{plain}' split 'train' has a colour, number, object or spatial "
         "word to swap (see jaxret/data/caption_swaps.py)")
  assert skipped["skipped"] == {"compositional": why}
  assert printed.splitlines().count(f"eval: skipping compositional on 'plain': {why}") == 1
  from jaxret.eval.report import format_table
  table = format_table(result)
  assert f"compositional skipped: {why}" in table and "compositional: true caption" in table


# --- end to end: training, eval.json, metrics, tables, plots ---------------------------------


def test_training_reports_compositional(tiny_config, tmp_path, capsys):
  from jaxret import cli
  from jaxret.eval.compare import compare_table
  from jaxret.train.loop import train
  cfg = tiny_config("softmax", "eval.tasks=('retrieval','compositional')", "total_steps=2",
                    "optim.warmup_steps=1", "checkpoint.every=0")
  workdir = str(tmp_path / "run")
  result = train(cfg, workdir, progress=False)
  printed = capsys.readouterr().out
  with open(os.path.join(workdir, "eval.json")) as f:
    saved = json.load(f)
  comp = saved["compositional"]
  for t in TYPES:
    assert comp[t]["chance"] == 0.5 and comp[t]["images"] == 64 and comp[t]["pairs"] > 0
    assert 0 <= comp[t]["accuracy"] <= 1
  assert comp == json.loads(json.dumps(result["compositional"]))
  assert "compositional: true caption vs swapped variants" in printed
  relation = 100 * comp["relation"]["accuracy"]
  assert f"relation  {relation:5.1f}% [50.0%]  (64 images, 256 pairs)" in printed
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  final = [r for r in rows if "eval/i2t_R@1" in r][-1]
  for t in TYPES:
    assert final[f"eval/compositional_{t}/accuracy"] == comp[t]["accuracy"]
  cli.run(["plot", "--workdir", workdir])
  with open(os.path.join(workdir, "plots", "training.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # `make demo`'s closing table: compositional columns, "-" for a run without them.
  other = tmp_path / "old"
  other.mkdir()
  (other / "eval.json").write_text(json.dumps({k: v for k, v in saved.items()
                                               if k != "compositional"}))
  table = compare_table([workdir, str(other)]).splitlines()
  assert table[0].endswith("; compositional 50%)")
  assert table[1].split()[-3:] == ["attribute", "object", "relation"]
  assert table[2].split()[-3:] == [f"{100 * comp[t]['accuracy']:.1f}%" for t in TYPES]
  assert table[3].split()[-3:] == ["-", "-", "-"]
  assert "attribute" not in compare_table([str(other)])

"""Evaluation held to brute-force references on small random data, and hand-worked cases."""
import json
import os

import jax
import numpy as np
import pytest

from jaxret.eval import hubness, late_interaction, ranking, zeroshot
from jaxret.eval.ranking import Ranker
from jaxret.losses.filip import filip_scores
from jaxret.parallel.mesh import make_mesh


@pytest.fixture(scope="module")
def ranker():
  from jaxret.config import defaults
  # Tiny blocks: many blocks, padded last blocks, 8 devices each holding a slice of a block.
  return Ranker(make_mesh(defaults().mesh), block_elements=64)


def loop_ranks(scores, key, owner):
  """The definition, one query at a time."""
  out = []
  for q in range(len(scores)):
    pos = [g for g in range(scores.shape[1]) if owner[g] == key[q]]
    best = max(scores[q, g] for g in pos)
    out.append(sum(1 for g in range(scores.shape[1]) if owner[g] != key[q] and scores[q, g] >= best))
  return np.array(out)


def multi_caption(rng, n=13, per=(1, 4), d=8, levels=None):
  """Random unit embeddings, n images with a random number of captions each; `levels`
  quantises the embeddings so scores tie often."""
  counts = rng.integers(per[0], per[1] + 1, n)
  owner = np.repeat(np.arange(n), counts)
  img, txt = rng.normal(size=(n, d)), rng.normal(size=(len(owner), d))
  if levels:
    img, txt = np.round(img * levels) / levels, np.round(txt * levels) / levels
  return img.astype(np.float32), txt.astype(np.float32), owner


# --- ranks ------------------------------------------------------------------------------


def test_hand_worked_multi_caption_ranks():
  # 2 images; image 0 owns captions 0, 1; image 1 owns caption 2.
  s = np.array([[0.1, 0.5, 0.7],    # image 0: best own caption 0.5, caption 2 (0.7) above
                [0.2, 0.9, 0.3]])   # image 1: own 0.3, captions 0 (no, 0.2) and 1 (0.9) above
  owner = np.array([0, 0, 1])
  assert ranking.rank_dense(s, np.arange(2), owner).tolist() == [1, 1]
  # t2i: caption 0 -> image 0 (0.1 vs 0.2: rank 1), caption 1 (0.5 vs 0.9: 1), caption 2 (0.3 vs 0.7: 1)
  assert ranking.rank_dense(s.T, owner, np.arange(2)).tolist() == [1, 1, 1]
  # A tie with a negative counts against the model; a tie between two own captions does not.
  s = np.array([[0.5, 0.5, 0.5]])
  assert ranking.rank_dense(s, np.arange(1), np.array([0, 0, 1])).tolist() == [1]
  m = ranking.metrics(np.array([0, 1, 4, 20]), ks=(1, 5))
  assert m == {"R@1": 0.25, "R@5": 0.75, "mean_rank": 7.25, "median_rank": 3.5}  # 1-based: 1, 2, 5, 21
  assert ranking.rsum({"R@1": 0.5, "R@5": 1.0}, {"R@1": 0.25, "R@5": 0.5}, ks=(1, 5)) == 225.0


@pytest.mark.parametrize("levels", [None, 2])
def test_blocked_sharded_ranks_match_the_definition(ranker, levels):
  rng = np.random.default_rng(0 if levels is None else 1)
  img, txt, owner = multi_caption(rng, levels=levels)
  s = img @ txt.T
  images = np.arange(len(img))
  if levels:
    assert len(np.unique(s)) < s.size  # ties do occur
  got_i2t = ranker.ranks(img, images, txt, owner)
  got_t2i = ranker.ranks(txt, owner, img, images)
  np.testing.assert_array_equal(got_i2t, loop_ranks(s, images, owner))
  np.testing.assert_array_equal(got_t2i, loop_ranks(s.T, owner, images))
  np.testing.assert_array_equal(got_i2t, ranking.rank_dense(s, images, owner))


def test_top_k_and_bank_logsumexp(ranker):
  rng = np.random.default_rng(2)
  q, g = rng.normal(size=(11, 4)).astype(np.float32), rng.normal(size=(7, 4)).astype(np.float32)
  s = q @ g.T
  vals, idx = ranker.top_k(q, g, 3)
  np.testing.assert_array_equal(idx, np.argsort(-s, axis=1, kind="stable")[:, :3])
  np.testing.assert_allclose(vals, np.take_along_axis(s, idx, 1), rtol=1e-5)
  np.testing.assert_allclose(ranker.logsumexp_over_queries(q, g, 3.0),
                             np.log(np.exp(3.0 * s).sum(axis=0)), rtol=1e-5)


# --- hubness ------------------------------------------------------------------------------


def test_qb_norm_and_db_norm_match_the_papers_formulas(ranker):
  rng = np.random.default_rng(3)
  img, txt, owner = multi_caption(rng, n=12, d=6)
  bank_img = rng.normal(size=(9, 6)).astype(np.float32) * 0.5
  bank_txt = rng.normal(size=(15, 6)).astype(np.float32) * 0.5
  images = np.arange(len(img))
  beta = 2.0
  # t2i: caption queries, image gallery; query bank = bank captions, gallery bank = bank images.
  s = txt @ img.T
  qb = hubness.qb_norm(ranker, img, bank_txt, beta=beta, k=1)
  want = hubness.qb_norm_dense(s, bank_txt @ img.T, beta=beta, k=1)
  np.testing.assert_array_equal(ranker.ranks(txt, owner, img, images, **qb),
                                ranking.rank_dense(want, owner, images))
  db = hubness.db_norm(ranker, img, bank_txt, bank_img, beta_query=beta, beta_gallery=1.5)
  want = hubness.db_norm_dense(s, bank_txt @ img.T, bank_img @ img.T, beta_query=beta,
                               beta_gallery=1.5)
  np.testing.assert_array_equal(ranker.ranks(txt, owner, img, images, **db),
                                ranking.rank_dense(want, owner, images))
  # i2t: image queries over captions, bank images as queries, bank captions as gallery bank.
  qb = hubness.qb_norm(ranker, txt, bank_img, beta=beta, k=2)
  want = hubness.qb_norm_dense(img @ txt.T, bank_img @ txt.T, beta=beta, k=2)
  np.testing.assert_array_equal(ranker.ranks(img, images, txt, owner, **qb),
                                ranking.rank_dense(want, images, owner))


def test_inverted_softmax_demotes_a_hub_by_hand():
  # Gallery items g0 (a hub: close to every bank query) and g1. Query prefers g0 slightly.
  scores = np.array([[0.6, 0.5]])
  bank = np.array([[0.9, 0.1], [0.8, 0.2]])
  out = hubness.qb_norm_dense(scores, bank, beta=1.0, k=1)
  # exp(.6)/(exp(.9)+exp(.8)) = 1.82212/(2.45960+2.22554) = 0.38891
  # exp(.5)/(exp(.1)+exp(.2)) = 1.64872/(1.10517+1.22140) = 0.70865: g1 wins now.
  np.testing.assert_allclose(out, [[0.38891, 0.70865]], rtol=1e-4)
  # A query whose top-1 is outside the activation set (g1 is no bank query's top-1) keeps raw.
  out = hubness.qb_norm_dense(np.array([[0.1, 0.7]]), bank, beta=1.0, k=1)
  np.testing.assert_array_equal(out, [[0.1, 0.7]])


# --- FILIP --------------------------------------------------------------------------------


def tokens(rng, n, length, d, min_valid=1):
  x = rng.normal(size=(n, length, d)).astype(np.float32)
  valid = np.arange(length)[None] < rng.integers(min_valid, length + 1, n)[:, None]
  return x, valid


def test_filip_exact_tiles_and_rerank_against_full_scores():
  rng = np.random.default_rng(4)
  n, per = 9, 3
  owner = np.repeat(np.arange(n), per)
  it, im = tokens(rng, n, 5, 4, min_valid=5)
  tt, tm = tokens(rng, len(owner), 6, 4)
  full_i, full_t = (np.asarray(x) for x in filip_scores(it, im, tt, tm))
  s_i, s_t = late_interaction.exact_scores(it, im, tt, tm, tile_elements=500)  # many tiles
  np.testing.assert_allclose(s_i, full_i, rtol=1e-5)
  np.testing.assert_allclose(s_t, full_t, rtol=1e-5)
  # Reranking every candidate (k = gallery) is exact; the candidate scores are FILIP's.
  cand = np.tile(np.arange(len(owner)), (n, 1))
  got = late_interaction.rerank_scores(it, im, tt, tm, cand, block=4)
  np.testing.assert_allclose(got, full_i, rtol=1e-5)
  cand = np.tile(np.arange(n), (len(owner), 1))
  np.testing.assert_allclose(late_interaction.rerank_scores(tt, tm, it, im, cand), full_t.T,
                             rtol=1e-5)


def test_two_stage_ranks_by_hand():
  # One image query (key 0), captions 0..4 owned by images [0, 1, 0, 2, 3].
  owner = np.array([0, 1, 0, 2, 3])
  cand = np.array([[1, 3, 2]])          # pooled top-3
  scores = np.array([[0.2, 0.9, 0.5]])  # rerank: caption 3 > caption 2 (own) > caption 1
  assert late_interaction.two_stage_ranks(cand, scores, np.array([0]), owner, np.array([2])).tolist() == [1]
  # No match among the candidates: the pooled rank stays.
  cand = np.array([[1, 3, 4]])
  assert late_interaction.two_stage_ranks(cand, scores, np.array([0]), owner, np.array([7])).tolist() == [7]


# --- zero-shot ----------------------------------------------------------------------------


def test_zeroshot_by_hand():
  logits = np.array([[0.9, 0.1, 0.5],
                     [0.2, 0.2, 0.1],
                     [0.1, 0.3, 0.8]])
  # Row 1: the true class ties with another: counts against the model at top-1.
  assert zeroshot.top_k_hits(logits, [0, 1, 1], ks=(1, 2)) == {"top1": 1 / 3, "top2": 1.0}
  # Scenes: any present class counts.
  # Row 0: best present is class 2 (0.5), class 0 above it; row 1: both present at 0.2, only
  # class 2 (0.1) is absent; row 2: absent class 2 (0.8) above the best present (0.3).
  assert zeroshot.top_k_hits(logits, [[1, 2], [0, 1], [0, 1]], ks=(1, 2)) == {"top1": 1 / 3,
                                                                              "top2": 1.0}
  got = zeroshot.chance([[0, 1]], 10, ks=(1, 5))
  assert got == pytest.approx({"top1": 0.2, "top5": 1 - 56 / 252})  # 1 - C(8,5)/C(10,5)

  class Tok:
    def encode_batch(self, texts):
      return np.array([[len(t)] for t in texts])
  # Prompts "a", "xay" (lengths 1, 3) and "bb", "xbby" (2, 4); each prompt normalised first.
  emb = {1: [2.0, 0.0], 3: [0.0, 1.0], 2: [3.0, 4.0], 4: [0.0, 2.0]}
  out = zeroshot.class_embeddings(lambda ids: np.array([emb[int(i)] for i in ids[:, 0]]), Tok(),
                                  ["a", "bb"], ["{}", "x{}y"])
  want_b = np.array([0.3, 0.9]) / np.linalg.norm([0.3, 0.9])
  np.testing.assert_allclose(out, [[2 ** -0.5, 2 ** -0.5], want_b], rtol=1e-6)


def test_item_views_keep_one_cell():
  image = np.arange(1, 4 * 4 * 3 + 1, dtype=np.uint8).reshape(4, 4, 3)
  views = zeroshot.item_views(image, [["bag", "red", "top right"]],
                              ["top left", "top right", "bottom left", "bottom right"])
  v = views[0]
  np.testing.assert_array_equal(v[:2, 2:], image[:2, 2:])
  assert (v[2:] == 0).all() and (v[:2, :2] == 0).all()


# --- end to end on the demo data -------------------------------------------------------------


@pytest.fixture(scope="module")
def filip_run(tiny_config, tmp_path_factory):
  """A 6-step FILIP run evaluated with every task (small bank, rerank of 5 candidates)."""
  from jaxret.train.loop import train
  workdir = str(tmp_path_factory.mktemp("filip"))
  cfg = tiny_config("filip", "eval.hubness_bank=64", "eval.filip_rerank_k=5")
  return workdir, cfg, train(cfg, workdir, progress=False)


def test_training_eval_reports_every_task(filip_run):
  workdir, _, result = filip_run
  assert result["num_images"] == 64 and result["num_captions"] == 4 * 64
  assert result["primary"] == "filip_exact"
  assert set(result["retrieval"]) == {"pooled", "pooled_qb_norm", "pooled_db_norm",
                                      "filip_exact", "filip_rerank"}
  assert result["i2t"] == {k: result["retrieval"]["filip_exact"]["i2t"][k]
                           for k in ("R@1", "R@5", "R@10")}
  assert 0 <= result["retrieval"]["filip_rerank"]["same_rank_as_exact"]["i2t"] <= 1
  zs = result["zeroshot"]
  assert zs["item"]["num_images"] == 2 * 64 and zs["scene"]["num_images"] == 64
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  final = [r for r in rows if "eval/i2t_R@1" in r][-1]
  assert final["eval/pooled_db_norm/t2i_R@1"] == result["retrieval"]["pooled_db_norm"]["t2i"]["R@1"]
  assert "eval/zeroshot_item/top1" in final


def test_eval_matches_brute_force_on_the_same_embeddings(filip_run):
  """Recompute pooled and exact-FILIP recall from the evaluator's own embeddings, densely."""
  from jaxret.eval.retrieval import RetrievalEvaluator
  from jaxret.eval.suite import build_evaluator
  from jaxret.experiment import Experiment
  from jaxret.workdir import restore_params
  workdir, cfg, result = filip_run
  exp = Experiment(cfg)
  params, _ = restore_params(exp.abstract_state, workdir)
  ev = build_evaluator(exp)
  emb = ev.embed_records(params, "test")
  img, txt, owner = emb["image"]["image_emb"], emb["text"]["text_emb"], emb["caption_image"]
  images = np.arange(len(img))
  got = ranking.metrics(ranking.rank_dense(img @ txt.T, images, owner), cfg.eval.ks)
  assert got == pytest.approx(result["retrieval"]["pooled"]["i2t"])
  s_i, s_t = (np.asarray(x) for x in filip_scores(
      emb["image"]["image_tokens"], emb["image"]["image_mask"], emb["text"]["text_tokens"],
      emb["text"]["text_mask"]))
  exact = result["retrieval"]["filip_exact"]
  assert ranking.metrics(ranking.rank_dense(s_i, images, owner), cfg.eval.ks) == pytest.approx(exact["i2t"])
  assert ranking.metrics(ranking.rank_dense(s_t.T, owner, images), cfg.eval.ks) == pytest.approx(exact["t2i"])
  # Reranking the whole gallery is the exact ranking.
  whole = cfg.copy_and_resolve_references()
  with whole.unlocked():
    whole.eval.filip_rerank_k = len(txt)
  out = RetrievalEvaluator(ev.ranker, whole.eval, late_interaction=True)(emb)["variants"]
  assert out["filip_rerank"]["t2i"] == pytest.approx(out["filip_exact"]["t2i"])


def test_cli_eval_and_plot(filip_run, capsys):
  from jaxret import cli
  workdir, _, _ = filip_run
  cli.run(["eval", "--workdir", workdir, "--tasks", "retrieval,zeroshot"])
  out = capsys.readouterr().out
  assert "FILIP exact" in out and "zero-shot" in out and "recall_at_k.png" in out
  with open(os.path.join(workdir, "eval.json")) as f:
    saved = json.load(f)
  assert saved["tasks"] == ["retrieval", "zeroshot"] and "pooled_qb_norm" not in saved["retrieval"]
  os.remove(os.path.join(workdir, "plots", "training.png"))
  cli.run(["plot", "--workdir", workdir])
  for name in ("recall_at_k.png", "training.png"):
    with open(os.path.join(workdir, "plots", name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_task_names_the_valid_ones(filip_run):
  from jaxret.errors import UserError
  from jaxret.eval.run import evaluate_workdir
  with pytest.raises(UserError, match="unknown eval task 'zeroshoot'.*zeroshot"):
    evaluate_workdir(filip_run[0], tasks=["zeroshoot"])


def test_compare_table_of_single_and_multi_set_runs(tmp_path):
  """`make demo`'s closing table: one row per run, one table per evaluation set."""
  from jaxret.eval.compare import compare_table

  def result(r1):
    return {"similarity": "cosine", "num_pairs": 4, "num_captions": 8,
            "i2t": {"R@1": r1, "R@5": 1.0}, "t2i": {"R@1": r1 / 2, "R@5": 1.0}}
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "eval.json").write_text(json.dumps(result(0.5)))
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "eval.json").write_text(json.dumps(
      {"step": 3, "sets": {"coco": result(0.25), "f30k": result(0.75)}}))
  single = compare_table([str(tmp_path / "a")]).splitlines()
  assert single[0].startswith("held-out retrieval, 4 images, 8 captions (chance t2i R@1 = 25.00%)")
  assert single[2].split() == ["a", "cosine", "50.0%", "100.0%", "25.0%", "100.0%"]
  tables = compare_table([str(tmp_path / "b")]).split("\n\n")
  assert [t.splitlines()[0].split(",")[0] for t in tables] == [
      "held-out retrieval on coco", "held-out retrieval on f30k"]
  assert tables[1].splitlines()[2].split()[2] == "75.0%"

"""Image<->text retrieval with several captions per image (the COCO/Flickr protocol).

image->text: a hit at K if ANY of the image's captions ranks within K; text->image: every
caption is a query and its one image must rank within K. Ranks are exact and pessimistic
(ties count against the model), computed blockwise on the devices (`ranking.Ranker`).

Scorings, each reported as a variant (`result["retrieval"][name]`):
  pooled            cosine of pooled embeddings (every model)
  pooled_qb_norm    pooled + QB-Norm, pooled_db_norm: pooled + DBNorm (task "hubness";
                    banks of training images and captions, see hubness.py)
  filip_exact       FILIP late interaction on every pair (late-interaction models, galleries
                    up to eval.filip_exact_max_pairs image-caption pairs)
  filip_rerank      two-stage: top eval.filip_rerank_k by pooled cosine, then late interaction
The primary variant (top-level "i2t"/"t2i") is what the loss trained: pooled, or FILIP
(exact when it was computed, else the rerank).
"""
import numpy as np

from jaxret.eval import hubness, late_interaction, ranking


def summarise(i2t_ranks, t2i_ranks, ks, curve_max_k):
  i2t, t2i = ranking.metrics(i2t_ranks, ks), ranking.metrics(t2i_ranks, ks)
  curve = lambda r: [float(np.mean(r < k)) for k in range(1, curve_max_k + 1)]
  return {"i2t": i2t, "t2i": t2i, "rsum": ranking.rsum(i2t, t2i, ks),
          "curve": {"i2t": curve(i2t_ranks), "t2i": curve(t2i_ranks)}}


class RetrievalEvaluator:
  """Turns embeddings of a split (and optionally of training banks) into retrieval results."""

  def __init__(self, ranker, eval_cfg, late_interaction=False):
    self.ranker, self.cfg, self.late = ranker, eval_cfg, late_interaction

  def __call__(self, emb, bank=None):
    """emb: {"image": {...}, "text": {...}, "caption_image": [T]} host arrays;
    bank: the same for training records (enables the hubness variants)."""
    c, r = self.cfg, self.ranker
    img, txt, owner = emb["image"]["image_emb"], emb["text"]["text_emb"], emb["caption_image"]
    n, t = len(img), len(txt)
    images = np.arange(n)
    ks, curve_k = tuple(c.ks), min(c.curve_max_k, n, t)
    out, raw = {}, {}
    raw["i2t"] = r.ranks(img, images, txt, owner)
    raw["t2i"] = r.ranks(txt, owner, img, images)
    out["pooled"] = summarise(raw["i2t"], raw["t2i"], ks, curve_k)

    if bank is not None:
      b_img, b_txt = bank["image"]["image_emb"], bank["text"]["text_emb"]
      # i2t: image queries (bank: training images) over captions (bank: training captions).
      for name, i2t_fix, t2i_fix in (
          ("pooled_qb_norm",
           hubness.qb_norm(r, txt, b_img, beta=c.hubness_beta, k=c.hubness_topk),
           hubness.qb_norm(r, img, b_txt, beta=c.hubness_beta, k=c.hubness_topk)),
          ("pooled_db_norm",
           hubness.db_norm(r, txt, b_img, b_txt, beta_query=c.hubness_beta,
                           beta_gallery=c.hubness_beta_gallery),
           hubness.db_norm(r, img, b_txt, b_img, beta_query=c.hubness_beta,
                           beta_gallery=c.hubness_beta_gallery))):
        out[name] = summarise(r.ranks(img, images, txt, owner, **i2t_fix),
                              r.ranks(txt, owner, img, images, **t2i_fix), ks, curve_k)

    primary = "pooled"
    if self.late:
      li = _late_inputs(emb)
      if n * t <= c.filip_exact_max_pairs:
        s_i, s_t = late_interaction.exact_scores(*li["image"], *li["text"])
        exact = (ranking.rank_dense(s_i, images, owner), ranking.rank_dense(s_t.T, owner, images))
        out["filip_exact"] = summarise(*exact, ks, curve_k)
      rerank = []
      for (q, qk, g, go, pooled, kind_q, kind_g) in (
          (img, images, txt, owner, raw["i2t"], "image", "text"),
          (txt, owner, img, images, raw["t2i"], "text", "image")):
        k = min(c.filip_rerank_k, len(g))
        _, cand = r.top_k(q, g, k)
        scores = late_interaction.rerank_scores(*li[kind_q], *li[kind_g], cand)
        rerank.append(late_interaction.two_stage_ranks(cand, scores, qk, go, pooled))
      out["filip_rerank"] = summarise(*rerank, ks, curve_k)
      out["filip_rerank"]["k"] = int(c.filip_rerank_k)
      if "filip_exact" in out:
        out["filip_rerank"]["same_rank_as_exact"] = {
            d: float(np.mean(a == b)) for d, a, b in zip(("i2t", "t2i"), rerank, exact)}
      primary = "filip_exact" if "filip_exact" in out else "filip_rerank"
    return {"primary": primary, "variants": out}


def _late_inputs(emb):
  return {"image": (emb["image"]["image_tokens"], emb["image"]["image_mask"]),
          "text": (emb["text"]["text_tokens"], emb["text"]["text_mask"])}

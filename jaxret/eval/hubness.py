"""Hubness corrections: post-hoc score normalisation with banks of training embeddings.

A "hub" is a gallery item that is the nearest neighbour of many queries. Both methods
divide exp(beta * s(q, g)) by how strongly gallery item g attracts a bank of probes, and
rank by the log of the result, which for a fixed query is a * s(q, g) - offset[g]:

QB-Norm (Bogolin et al. 2022), dynamic inverted softmax with a query bank B_q (training
  queries of the query modality):
    IS(q, g) = exp(beta s(q, g)) / sum_{b in B_q} exp(beta s(b, g))
  applied only to queries whose raw top-1 gallery item lies in the activation set
  A = {g : g is in the raw top-k of some bank query}; other queries keep raw scores.
DBNorm (Wang et al. 2023), dual inverted softmax with the query bank and a gallery bank
  B_g (training items of the gallery modality):
    DIS(q, g) = exp(beta1 s(q, g)) / sum_{b in B_q} exp(beta1 s(b, g))
              * exp(beta2 s(q, g)) / sum_{h in B_g} exp(beta2 s(h, g))
  for every query (the paper's non-dynamic variant).

Both only reorder each query's gallery, so recall needs only the per-item offsets, which
are log-sum-exps over the bank computed in blocks (`Ranker.logsumexp_over_queries`).
"""
import numpy as np


def qb_norm(ranker, gallery, query_bank, *, beta, k=1):
  """-> dict(a, offset [G], active [G]) for `Ranker.ranks`."""
  offset = ranker.logsumexp_over_queries(query_bank, gallery, beta)
  _, top = ranker.top_k(query_bank, gallery, min(k, len(gallery)))
  active = np.zeros(len(gallery), bool)
  active[top.ravel()] = True
  return dict(a=float(beta), offset=offset, active=active)


def db_norm(ranker, gallery, query_bank, gallery_bank, *, beta_query, beta_gallery):
  offset = (ranker.logsumexp_over_queries(query_bank, gallery, beta_query)
            + ranker.logsumexp_over_queries(gallery_bank, gallery, beta_gallery))
  return dict(a=float(beta_query + beta_gallery), offset=offset, active=None)


# ----------------------------------------------------------------------------------------
# Brute-force references on full score matrices, straight from the papers' formulas
# (used by the tests; exp without log-space tricks, so keep betas and scores small).


def qb_norm_dense(scores, bank_scores, *, beta, k=1):
  """scores [Q, G] test queries x gallery, bank_scores [B, G] -> normalised [Q, G]."""
  activation = np.unique(np.argsort(-bank_scores, axis=1, kind="stable")[:, :k])
  normalised = np.exp(beta * scores) / np.exp(beta * bank_scores).sum(axis=0)
  top1 = np.argmax(scores, axis=1)
  use = np.isin(top1, activation)
  return np.where(use[:, None], normalised, scores)


def db_norm_dense(scores, query_bank_scores, gallery_bank_scores, *, beta_query, beta_gallery):
  """query_bank_scores [Bq, G] (bank queries x gallery), gallery_bank_scores [Bg, G]."""
  q = np.exp(beta_query * scores) / np.exp(beta_query * query_bank_scores).sum(axis=0)
  g = np.exp(beta_gallery * scores) / np.exp(beta_gallery * gallery_bank_scores).sum(axis=0)
  return q * g

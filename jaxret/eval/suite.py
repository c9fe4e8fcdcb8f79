"""The evaluations a config names (`eval.tasks`), run on one set of embeddings of a split.

  retrieval  multi-caption image<->text retrieval (retrieval.py), plus FILIP exact and
             two-stage rerank for late-interaction models
  hubness    QB-Norm and DBNorm beside the raw pooled scores, banks from the first
             eval.hubness_bank records of the training split
  zeroshot   classification from class-name prompts (zeroshot.py); needs the manifest's
             "classes" and "cells" and records whose meta lists their "items"

Result (also eval.json): {"step", "split", "similarity", "num_pairs" (= images),
"num_images", "num_captions", "tasks", "primary", "i2t", "t2i" (the primary variant's
Recall@K), "rsum", "retrieval": {variant: {"i2t", "t2i", "rsum", "curve"}}, "zeroshot"}.
"""
import numpy as np

from jaxret.data.pipeline import eval_records
from jaxret.errors import UserError, did_you_mean
from jaxret.parallel import partitioning
from jaxret.eval import zeroshot
from jaxret.eval.embed import Embedder, concat
from jaxret.eval.ranking import Ranker
from jaxret.eval.retrieval import RetrievalEvaluator

TASKS = ("retrieval", "hubness", "zeroshot")


def check_tasks(tasks):
  for t in tasks:
    if t not in TASKS:
      raise UserError(f"unknown eval task '{t}'{did_you_mean(t, TASKS)} in eval.tasks; valid: "
                      f"{', '.join(TASKS)}")
  if "hubness" in tasks and "retrieval" not in tasks:
    raise UserError("eval task 'hubness' corrects retrieval scores: add 'retrieval' to eval.tasks")
  return tuple(tasks)


def build_evaluator(exp):
  """The evaluator of an experiment (jaxret.experiment.Experiment): its config's eval split,
  tasks and data, in its mesh and parameter shardings."""
  c = exp.cfg
  return Evaluator(exp.model, exp.loss, exp.mesh, exp.state_sh.params,
                   data_dir=c.data.dir, split=c.data.eval_split, train_split=c.data.train_split,
                   tokenizer=exp.tokenizer, manifest=exp.manifest, eval_cfg=c.eval,
                   image_size=c.model.image.size, rules=exp.rules)


class Evaluator:
  """evaluator(params, step) -> result dict; builds its jitted functions once."""

  def __init__(self, model, loss, mesh, param_shardings, *, data_dir, split, train_split,
               tokenizer, manifest, eval_cfg, image_size=None,
               rules=partitioning.DEFAULT_RULES):
    self.tasks = check_tasks(eval_cfg.tasks)
    self.cfg, self.loss, self.tokenizer, self.manifest = eval_cfg, loss, tokenizer, manifest
    self.data_dir, self.split, self.train_split = data_dir, split, train_split
    self.image_size = image_size  # None: the stored size
    self.late = loss.similarity == "late_interaction"
    self.embed = Embedder(model, mesh, param_shardings, eval_cfg.batch_size, tokens=self.late,
                          rules=rules)
    self.ranker = Ranker(mesh, eval_cfg.block_elements)
    self.retrieval = RetrievalEvaluator(self.ranker, eval_cfg, self.late)
    if "zeroshot" in self.tasks:
      missing = [k for k in ("classes", "cells") if k not in manifest]
      if missing:
        raise UserError(f"eval task 'zeroshot' needs {', '.join(missing)} in the manifest of "
                        f"'{data_dir}' (the demo data has them); remove 'zeroshot' from eval.tasks")

  # -- embedding ---------------------------------------------------------------------------

  def embed_records(self, params, split, max_records=None, views=False):
    """Embeds images and captions (and per-item views) of a split, in record order."""
    m = self.cfg.captions_per_image or None
    images, texts, owner, items, view_parts, view_labels = [], [], [], [], [], []
    start = 0
    for batch in eval_records(self.data_dir, batch_size=self.embed.batch_size, split=split,
                              max_records=max_records, image_size=self.image_size):
      images.append(self.embed(params, "image", batch["image"]))
      caps = [c[:m] for c in batch["captions"]]
      texts.append(self.embed(params, "text", self.tokenizer.encode_batch(
          [c for cs in caps for c in cs])))
      owner += [start + i for i, cs in enumerate(caps) for _ in cs]
      start += len(caps)
      items += [meta.get("items", []) for meta in batch["meta"]]
      if views:
        vs = [(v, self._class(it[0])) for image, meta in zip(batch["image"], batch["meta"])
              for it, v in zip(meta.get("items", []),
                               zeroshot.item_views(image, meta.get("items", []),
                                                   list(self.manifest["cells"])))]
        if vs:
          view_parts.append(self.embed(params, "image", np.stack([v for v, _ in vs])))
          view_labels += [label for _, label in vs]
    emb = {"image": concat(images), "text": concat(texts), "caption_image": np.asarray(owner),
           "items": items}
    if views:
      emb["views"], emb["view_labels"] = concat(view_parts), view_labels
    return self._filip_masks(emb)

  def _class(self, name):
    classes = list(self.manifest["classes"])
    if name not in classes:
      raise UserError(f"record item class '{name}' is not in the manifest's classes "
                      f"({', '.join(classes)}): rebuild the dataset")
    return classes.index(name)

  def _filip_masks(self, emb):
    """Scores leave out the cls / end tokens when the loss was trained without them."""
    if self.late and not getattr(self.loss, "options", {}).get("filip_special_tokens", True):
      from jaxret.losses.filip import drop_special
      for kind in ("image", "text"):
        e = emb[kind]
        e[f"{kind}_mask"] = np.asarray(drop_special(e[f"{kind}_mask"], e[f"{kind}_special"]))
    return emb

  # -- tasks -------------------------------------------------------------------------------

  def __call__(self, params, step):
    c = self.cfg
    emb = self.embed_records(params, self.split, views="zeroshot" in self.tasks)
    n, t = len(emb["image"]["image_emb"]), len(emb["caption_image"])
    result = {"step": int(step), "split": self.split, "similarity": self.loss.similarity,
              "num_pairs": int(n), "num_images": int(n), "num_captions": int(t),
              "tasks": list(self.tasks)}
    if "retrieval" in self.tasks:
      bank = None
      if "hubness" in self.tasks:
        bank = self.embed_records(params, self.train_split, max_records=c.hubness_bank or None)
      r = self.retrieval(emb, bank)
      primary = r["variants"][r["primary"]]
      ks = [f"R@{k}" for k in c.ks]
      result.update(primary=r["primary"], rsum=primary["rsum"],
                    i2t={k: primary["i2t"][k] for k in ks}, t2i={k: primary["t2i"][k] for k in ks},
                    retrieval=r["variants"])
    if "zeroshot" in self.tasks:
      result["zeroshot"] = self.zeroshot(params, emb)
    return result

  def zeroshot(self, params, emb):
    classes, templates = list(self.manifest["classes"]), list(self.cfg.zeroshot_templates)
    class_emb = zeroshot.class_embeddings(lambda ids: self.embed(params, "text", ids)["text_emb"],
                                          self.tokenizer, classes, templates)
    out = {"num_classes": len(classes), "num_templates": len(templates)}
    scene_labels = [[self._class(it[0]) for it in items] for items in emb["items"]]
    if all(scene_labels):
      out["scene"] = zeroshot.accuracy(emb["image"]["image_emb"], class_emb, scene_labels,
                                       self.cfg.zeroshot_ks)
    if emb.get("view_labels"):
      out["item"] = zeroshot.accuracy(emb["views"]["image_emb"], class_emb, emb["view_labels"],
                                      self.cfg.zeroshot_ks)
    return out

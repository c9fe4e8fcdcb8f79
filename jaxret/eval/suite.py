"""The evaluations a config names (`eval.tasks`), run on each evaluation set (`eval.sets`).

  retrieval  multi-caption image<->text retrieval (retrieval.py), plus FILIP exact and
             two-stage rerank for late-interaction models
  hubness    QB-Norm and DBNorm beside the raw pooled scores, banks from the first
             eval.hubness_bank records of data.dir's training split (one bank for every set)
  zeroshot   classification from class-name prompts (zeroshot.py) on a set whose data or
             config gives classes (jaxret/data/classes.py: the demo's items, records' labels
             with a class file or a TFDS source's label names); skipped, with one printed
             line, on a set without any
  compositional  the true caption against swapped variants of it, per swap type (attribute,
             object, relation; compositional.py); skipped, with one printed line, on a set
             whose captions have no word to swap (found when the set is first evaluated)

Everything the tasks need is checked when the evaluator is built, which training does before
its first step: each set's dir and split, the bank's split, the classes and a first label.
Every set is tokenized with the run's tokenizer; a set's own tokenizer is never read.

Result of one set (also eval.json when eval.sets is ()): {"step", "split", "similarity",
"num_pairs" (= images), "num_images", "num_captions", "tasks", "primary", "i2t", "t2i" (the
primary variant's Recall@K), "rsum", "retrieval": {variant: {"i2t", "t2i", "rsum", "curve"}},
"zeroshot", "compositional", "skipped": {task: why}}. With named sets: {"step", "sets": {name:
that result, plus "data_dir"}}, in the order of eval.sets.
"""
import dataclasses

import jax
import numpy as np

from jaxret.config import parse_eval_sets
from jaxret.data import classes as class_sources, sources
from jaxret.data.pipeline import eval_records
from jaxret.errors import UserError, did_you_mean
from jaxret.parallel import partitioning
from jaxret.eval import compositional, zeroshot
from jaxret.eval.embed import Embedder, concat
from jaxret.eval.ranking import Ranker
from jaxret.eval.report import VARIANT_NAMES
from jaxret.eval.retrieval import RetrievalEvaluator

TASKS = ("retrieval", "hubness", "zeroshot", "compositional")


def check_tasks(tasks):
  for t in tasks:
    if t not in TASKS:
      raise UserError(f"unknown eval task '{t}'{did_you_mean(t, TASKS)} in eval.tasks; valid: "
                      f"{', '.join(TASKS)}")
  if "hubness" in tasks and "retrieval" not in tasks:
    raise UserError("eval task 'hubness' corrects retrieval scores: add 'retrieval' to eval.tasks")
  return tuple(tasks)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  name: str
  data_dir: str
  split: str
  manifest: dict
  classes: object = None  # data.classes.Classes, or None: no zero-shot on this set
  skipped: tuple = ()     # ((task, why), ...)


def build_evaluator(exp):
  """The evaluator of an experiment (jaxret.experiment.Experiment): its config's eval sets,
  tasks and data, in its mesh and parameter shardings."""
  c = exp.cfg
  return Evaluator(exp.model, exp.loss, exp.mesh, exp.state_sh.params,
                   data_dir=c.data.dir, split=c.data.eval_split, train_split=c.data.train_split,
                   tokenizer=exp.tokenizer, manifest=exp.manifest, eval_cfg=c.eval,
                   image_size=c.model.image.size, rules=exp.rules)


def _check_split(data_dir, manifest, split, key, fix=""):
  splits = manifest.get("splits", {})
  if split not in splits:
    raise UserError(f"{key} '{split}' is not a split of '{data_dir}'{did_you_mean(split, splits)}"
                    f"; splits present: {', '.join(sorted(splits)) or 'none'}{fix}")
  sources.split_files(data_dir, split, manifest)  # its shards exist


def _first_meta(data_dir, split):
  records = sources.open_split(data_dir, split)
  return sources.decode_record(records[0]).get("meta", {}) if len(records) else {}


def plan_sets(eval_cfg, data_dir, split, manifest):
  """[EvalSet], each checked against its data (one-line UserErrors naming the key to fix)."""
  named = parse_eval_sets(eval_cfg.sets)
  entries = named or [(split, "", "")]
  zero = "zeroshot" in eval_cfg.tasks
  out = []
  for name, set_dir, set_split in entries:
    if name in VARIANT_NAMES:
      raise UserError(f"eval.sets name '{name}' is a retrieval scoring's name: rename the set")
    d, sp = set_dir or data_dir, set_split or split
    key = f"eval.sets entry '{name}' split" if named else "data.eval_split"
    m = manifest if d == data_dir else sources.load_manifest(d)
    _check_split(d, m, sp, key)
    classes, skipped = None, ()
    if zero:
      classes = class_sources.find_classes(d, m, sp, eval_cfg.zeroshot_classes)
      if classes is None:
        skipped = (("zeroshot", class_sources.describe_missing(d, m, sp)
                    + " (set eval.zeroshot_classes)"),)
      elif classes.items and "cells" not in m:
        raise UserError(f"data '{d}' lists items per record but its manifest has no 'cells': "
                        "rebuild the dataset")
      else:  # one label now: a wrong class file or unlabelled data fails before step 1
        classes.label(_first_meta(d, sp), f"the first record of '{d}' split '{sp}'")
    out.append(EvalSet(name, d, sp, m, classes, skipped))
  return out


class Evaluator:
  """evaluator(params, step) -> result dict; builds its jitted functions once and checks the
  data of every set when built."""

  def __init__(self, model, loss, mesh, param_shardings, *, data_dir, split, train_split,
               tokenizer, manifest, eval_cfg, image_size=None,
               rules=partitioning.DEFAULT_RULES):
    self.tasks = check_tasks(eval_cfg.tasks)
    self.cfg, self.loss, self.tokenizer, self.manifest = eval_cfg, loss, tokenizer, manifest
    self.data_dir, self.split, self.train_split = data_dir, split, train_split
    self.image_size = image_size  # None: the stored size
    self.named = bool(eval_cfg.sets)  # named sets: results under "sets"
    self.sets = plan_sets(eval_cfg, data_dir, split, manifest)
    if "hubness" in self.tasks:
      _check_split(data_dir, manifest, train_split, "data.train_split (the hubness bank's)",
                   " (or remove 'hubness' from eval.tasks)")
    self._said = set()  # (set, task) whose skip line is printed: once per evaluator
    for s in self.sets:
      for task, why in s.skipped:
        self._say_skipped(s, task, why)
    self.late = loss.similarity == "late_interaction"
    self.embed = Embedder(model, mesh, param_shardings, eval_cfg.batch_size, tokens=self.late,
                          rules=rules)
    self.ranker = Ranker(mesh, eval_cfg.block_elements)
    self.retrieval = RetrievalEvaluator(self.ranker, eval_cfg, self.late)

  # -- embedding ---------------------------------------------------------------------------

  def embed_records(self, params, split, max_records=None, eval_set=None, data_dir=None,
                    records=False):
    """Embeds images and captions of a split, in record order; with an `eval_set` that has
    classes, also each record's labels (and, for the demo's items, per-item views); with
    `records`, each record's (first caption, meta) as "records"."""
    m = self.cfg.captions_per_image or None
    data_dir = eval_set.data_dir if eval_set else (data_dir or self.data_dir)
    classes = eval_set.classes if eval_set else None
    images, texts, owner, labels, view_parts, view_labels = [], [], [], [], [], []
    kept = []
    start = 0
    for batch in eval_records(data_dir, batch_size=self.embed.batch_size, split=split,
                              max_records=max_records, image_size=self.image_size):
      images.append(self.embed(params, "image", batch["image"]))
      caps = [c[:m] for c in batch["captions"]]
      texts.append(self.embed(params, "text", self.tokenizer.encode_batch(
          [c for cs in caps for c in cs])))
      owner += [start + i for i, cs in enumerate(caps) for _ in cs]
      if records:
        kept += [(cs[0], meta) for cs, meta in zip(caps, batch["meta"])]
      if classes is not None:
        labels += [classes.label(meta, f"record {start + i} of '{data_dir}' split '{split}'")
                   for i, meta in enumerate(batch["meta"])]
      if classes is not None and classes.items:
        cells = list(eval_set.manifest["cells"])
        vs = [(v, label) for image, meta, record_labels in
              zip(batch["image"], batch["meta"], labels[start:])
              for label, v in zip(record_labels,
                                  zeroshot.item_views(image, meta.get("items", []), cells))]
        if vs:
          view_parts.append(self.embed(params, "image", np.stack([v for v, _ in vs])))
          view_labels += [label for _, label in vs]
      start += len(caps)
    emb = {"image": concat(images), "text": concat(texts), "caption_image": np.asarray(owner)}
    if classes is not None:
      emb["labels"] = labels
    if view_labels:
      emb["views"], emb["view_labels"] = concat(view_parts), view_labels
    if records:
      emb["records"] = kept
    return self._filip_masks(emb)

  def _filip_masks(self, emb):
    """Scores leave out the cls / end tokens when the loss was trained without them."""
    if self.late and not getattr(self.loss, "options", {}).get("filip_special_tokens", True):
      from jaxret.losses.filip import drop_special
      for kind in ("image", "text"):
        if kind not in emb:
          continue
        e = emb[kind]
        e[f"{kind}_mask"] = np.asarray(drop_special(e[f"{kind}_mask"], e[f"{kind}_special"]))
    return emb

  # -- tasks -------------------------------------------------------------------------------

  def __call__(self, params, step):
    banks = {}  # the hubness bank, embedded once for every set

    def bank():
      if not banks:
        banks["train"] = self.embed_records(params, self.train_split,
                                            max_records=self.cfg.hubness_bank or None)
      return banks["train"]

    results = {s.name: self.evaluate_set(params, step, s, bank) for s in self.sets}
    if not self.named:
      return results[self.sets[0].name]
    for s in self.sets:
      results[s.name]["data_dir"] = s.data_dir
    return {"step": int(step), "sets": results}

  def evaluate_set(self, params, step, s, bank=None):
    """One set's result; `bank()` gives the hubness bank's embeddings."""
    c = self.cfg
    zero = "zeroshot" in self.tasks and s.classes is not None
    comp = "compositional" in self.tasks
    # data_dir: a named set without zero-shot classes is still its own folder, not data.dir.
    emb = self.embed_records(params, s.split, eval_set=s if zero else None, data_dir=s.data_dir,
                             records=comp)
    n, t = len(emb["image"]["image_emb"]), len(emb["caption_image"])
    result = {"step": int(step), "split": s.split, "similarity": self.loss.similarity,
              "num_pairs": int(n), "num_images": int(n), "num_captions": int(t),
              "tasks": list(self.tasks)}
    if "retrieval" in self.tasks:
      r = self.retrieval(emb, bank() if "hubness" in self.tasks else None)
      primary = r["variants"][r["primary"]]
      ks = [f"R@{k}" for k in c.ks]
      result.update(primary=r["primary"], rsum=primary["rsum"],
                    i2t={k: primary["i2t"][k] for k in ks}, t2i={k: primary["t2i"][k] for k in ks},
                    retrieval=r["variants"])
    if zero:
      result["zeroshot"] = self.zeroshot(params, emb, s.classes)
    skipped = dict(s.skipped)
    if comp:
      out = self.compositional(params, emb, s)
      if isinstance(out, str):
        skipped["compositional"] = out
        self._say_skipped(s, "compositional", out)
      else:
        result["compositional"] = out
    if skipped:
      result["skipped"] = skipped
    return result

  def _say_skipped(self, s, task, why):
    if (s.name, task) not in self._said and jax.process_index() == 0:
      print(f"eval: skipping {task}" + (f" on '{s.name}'" if self.named else "") + f": {why}",
            flush=True)
    self._said.add((s.name, task))

  def zeroshot(self, params, emb, classes):
    templates = list(self.cfg.zeroshot_templates) or list(
        zeroshot.DEMO_TEMPLATES if classes.items else zeroshot.DEFAULT_TEMPLATES)
    class_emb = zeroshot.class_embeddings(lambda ids: self.embed(params, "text", ids)["text_emb"],
                                          self.tokenizer, list(classes.names), templates)
    out = {"num_classes": len(classes.names), "num_templates": len(templates)}
    ks = self.cfg.zeroshot_ks
    if not classes.items:  # one label per image
      out["image"] = zeroshot.accuracy(emb["image"]["image_emb"], class_emb, emb["labels"], ks)
      return out
    if all(emb["labels"]):
      out["scene"] = zeroshot.accuracy(emb["image"]["image_emb"], class_emb, emb["labels"], ks)
    if emb.get("view_labels"):
      out["item"] = zeroshot.accuracy(emb["views"]["image_emb"], class_emb, emb["view_labels"], ks)
    return out

  def compositional(self, params, emb, s):
    """The compositional result of a set, or why it is skipped (no caption has a word to swap;
    known only once its captions are read)."""
    # The demo's variants come from each scene's items; other data's from its captions alone,
    # whatever its meta holds.
    demo = "cells" in s.manifest
    records = emb["records"] if demo else [(caption, {}) for caption, _ in emb["records"]]
    p = compositional.plan(records, self.tokenizer.encode_batch,
                           classes=s.manifest.get("classes") if demo else None)
    if not len(p.kind):
      return (f"no caption of data '{s.data_dir}' split '{s.split}' has a colour, number, "
              "object or spatial word to swap (see jaxret/data/caption_swaps.py)")
    variants = self._filip_masks({"text": self.embed(params, "text", p.ids)})["text"]
    first = np.searchsorted(emb["caption_image"], np.arange(p.num_images))  # record order
    gallery = {k: np.concatenate([emb["text"][k][first], v]) for k, v in variants.items()}
    rows, kinds = compositional.candidates(p.image, p.kind, p.num_images)
    scores = compositional.pair_scores(emb["image"], gallery, rows, late=self.late)
    return compositional.accuracy(scores, kinds)

"""The training loop: config -> mesh, data, model, state -> steps -> checkpoints, metrics, eval.

Rerunning the same command on the same workdir resumes from the latest checkpoint, with the
data iterator exactly where it was.
"""
import json
import os
import time

import jax
import numpy as np
import tqdm

from jaxret import losses
from jaxret.data.pipeline import skipped_total, train_iterator
from jaxret.data.sources import load_manifest, parse_mixture
from jaxret.data.tokenizers import load_tokenizer
from jaxret.errors import UserError
from jaxret.eval.report import format_table, write_result
from jaxret.models.two_tower import build_model
from jaxret.parallel import partitioning
from jaxret.parallel.mesh import batch_parallelism, make_mesh
from jaxret.train.checkpoint import Checkpointer
from jaxret.train.optim import make_optimizer
from jaxret.train.state import init_state, load_initial_params, state_shardings
from jaxret.train.step import make_train_step
from jaxret.train.writers import MetricWriter


class Experiment:
  """Everything a config builds before the first step (shared by train, eval and export)."""

  def __init__(self, cfg, devices=None):
    self.cfg = cfg
    self.mesh = make_mesh(cfg.mesh, devices)
    n, p = batch_parallelism(self.mesh), jax.process_count()
    if cfg.batch_size % n or cfg.batch_size % p:
      raise UserError(f"batch_size {cfg.batch_size} must be divisible by the {n} batch-parallel "
                      f"devices and {p} processes; change --config.batch_size")
    self.manifest = load_manifest(cfg.data.dir)
    self.tokenizer = load_tokenizer(os.path.join(cfg.data.dir, self.manifest["tokenizer"]),
                                    cfg.model.text.max_len)
    want_vocab = cfg.model.text.vocab_size
    if want_vocab and want_vocab != self.tokenizer.vocab_size:
      raise UserError(f"model.text.vocab_size is {want_vocab} but the tokenizer of "
                      f"'{cfg.data.dir}' has {self.tokenizer.vocab_size}; set it to 0 (from the "
                      "tokenizer) or use the matching data")
    self.model = build_model(cfg.model, vocab_size=self.tokenizer.vocab_size,
                             pad_id=self.tokenizer.pad_id, eos_id=self.tokenizer.eos_id)
    self.loss = losses.get_loss(cfg.loss.name, cfg.loss)
    self.tx, self.schedule = make_optimizer(cfg.optim, cfg.total_steps)
    self.abstract_state, self.state_sh = state_shardings(self.model, self.tx, self.mesh,
                                                         cfg.model.image.size)

  def evaluator(self):
    from jaxret.eval.suite import Evaluator
    c = self.cfg
    return Evaluator(self.model, self.loss, self.mesh, self.state_sh.params,
                     data_dir=c.data.dir, split=c.data.eval_split, train_split=c.data.train_split,
                     tokenizer=self.tokenizer, manifest=self.manifest, eval_cfg=c.eval,
                     image_size=c.model.image.size)


def train_augment(data_cfg):
  """The pipeline's augment argument (None: the evaluation view)."""
  aug = data_cfg.augment
  if not aug.enabled:
    return None
  return dict(crop_scale=tuple(aug.crop_scale), crop_ratio=tuple(aug.crop_ratio), flip=aug.flip)


def check_workdir_config(workdir, cfg):
  """A workdir belongs to one model and loss: say which key differs instead of failing later."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  new = json.loads(cfg.to_json())
  for section in ("model", "loss"):
    diff = _first_difference(saved.get(section, {}), new[section], section)
    if diff:
      key, old, now = diff
      raise UserError(f"workdir '{workdir}' holds a run of a different model: {key} is {old!r} "
                      f"there but {now!r} in this config; use a new --workdir, or the config "
                      "that wrote it")


def _first_difference(a, b, prefix):
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, dict) and isinstance(y, dict):
      d = _first_difference(x, y, f"{prefix}.{key}")
      if d:
        return d
    elif x != y:
      return f"{prefix}.{key}", x, y
  return None


def _global_batch(mesh, batch):
  sh = partitioning.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, batch[k]) for k in ("image", "text")}


def train(cfg, workdir, *, stop_after_step=None, progress=True, devices=None):
  """Train (or resume) to `cfg.total_steps`; returns the final evaluation result.

  `stop_after_step` ends the run early, as a preemption would (used by the resume test);
  `devices` restricts the mesh to a subset of the devices (default: all).
  """
  workdir = os.path.abspath(workdir)
  exp = Experiment(cfg, devices)
  check_workdir_config(workdir, cfg)
  ckpt = Checkpointer(workdir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                      async_save=cfg.checkpoint.async_save)
  data = train_iterator(cfg.data.dir, batch_size=cfg.batch_size // jax.process_count(),
                        text_len=cfg.model.text.max_len, seed=cfg.seed,
                        image_size=cfg.model.image.size, augment=train_augment(cfg.data),
                        mixture=parse_mixture(cfg.data.mixture),
                        split=cfg.data.train_split, workers=cfg.data.workers)
  start = ckpt.latest_step()
  if start is None:
    start = 0
    state = init_state(exp.model, exp.tx, exp.mesh, cfg.model.image.size, cfg.seed, exp.state_sh)
    if cfg.model.init_from:
      state = state.replace(params=load_initial_params(
          cfg.model.init_from, exp.abstract_state.params, exp.state_sh.params, cfg.model.scan,
          cfg.model.image))
  else:
    state = ckpt.restore(start, exp.abstract_state, data)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json(indent=2))
    if start:
      print(f"resuming {workdir} from step {start}", flush=True)

  writer = MetricWriter(workdir, resume_step=start)
  step_fn = make_train_step(exp.model, exp.loss, exp.tx, exp.schedule, exp.mesh, exp.state_sh,
                            cfg.optim.grad_accum_steps)
  evaluate = exp.evaluator()
  bar = tqdm.tqdm(total=cfg.total_steps, initial=start, disable=not progress or
                  jax.process_index() != 0, desc=f"train {cfg.loss.name}", unit="step",
                  dynamic_ncols=True)
  t0, last_logged = time.perf_counter(), start
  step = start
  try:
    while step < cfg.total_steps:
      state, metrics = step_fn(state, _global_batch(exp.mesh, next(data)))
      step += 1
      ckpt.save(step, state, data, force=step == cfg.total_steps)
      if step % cfg.log_every == 0 or step == cfg.total_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        metrics["examples_per_s"] = cfg.batch_size * (step - last_logged) / (now - t0)
        metrics["data/skipped"] = skipped_total(data)  # broken records so far (cumulative)
        t0, last_logged = now, step
        if not np.isfinite(metrics["loss"]):
          raise FloatingPointError(f"loss is {metrics['loss']} at step {step}; lower optim.lr "
                                   "or check the data")
        writer.write(step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", ex_s=f"{metrics['examples_per_s']:.0f}",
                        **({"skipped": metrics["data/skipped"]} if metrics["data/skipped"] else {}))
      bar.update(1)
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
        result = evaluate(state.params, step)
        writer.write(step, _eval_scalars(result))
        bar.write(format_table(result))
      if stop_after_step is not None and step >= stop_after_step:
        return None
    bar.close()
    result = evaluate(state.params, step)
    writer.write(step, _eval_scalars(result))
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  write_result(workdir, result)
  if jax.process_index() == 0:
    print(format_table(result), flush=True)
  return result


def _eval_scalars(result):
  """The primary Recall@K as eval/{i2t,t2i}_R@K; every scoring and zero-shot view below it."""
  out = {f"eval/{d}_{k}": v for d in ("i2t", "t2i") if d in result for k, v in result[d].items()}
  for name, v in result.get("retrieval", {}).items():
    out[f"eval/{name}/rsum"] = v["rsum"]
    out.update({f"eval/{name}/{d}_{k}": x for d in ("i2t", "t2i") for k, x in v[d].items()})
  for view, z in result.get("zeroshot", {}).items():
    if isinstance(z, dict):
      out.update({f"eval/zeroshot_{view}/{k}": x for k, x in z.items() if k.startswith("top")})
  return out

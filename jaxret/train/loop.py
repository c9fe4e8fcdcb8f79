"""The training loop: config -> mesh, data, model, state -> steps -> checkpoints, metrics, eval.

Rerunning the same command on the same workdir resumes from the latest checkpoint, with the
data iterator exactly where it was.
"""
import contextlib
import time

import jax
import tqdm

from jaxret import storage
from jaxret.checkpoint import Checkpointer
from jaxret.data.pipeline import check_hard_negatives, skipped_total, train_iterator
from jaxret.data.sources import parse_mixture
from jaxret.errors import Preempted
from jaxret.eval.report import format_table, write_result
from jaxret.eval.suite import build_evaluator
from jaxret.experiment import Experiment, init_state
from jaxret.optim import param_setting
from jaxret.lock import WorkdirLock
from jaxret.parallel import partitioning
from jaxret.train.health import Health
from jaxret.train.objective import distill_options
from jaxret.train.preemption import PreemptionGuard
from jaxret.train.step import make_train_step
from jaxret.inference.teacher import load_teacher
from jaxret.data.teacher_store import check_teacher_records
from jaxret.train.writers import MetricWriter
from jaxret.workdir import (absolute_data_dirs, check_workdir_config, load_initial_params,
                            save_run_files, write_run_config)


def train_augment(data_cfg):
  """The pipeline's augment argument (None: the evaluation view)."""
  aug = data_cfg.augment
  if not aug.enabled:
    return None
  return dict(crop_scale=tuple(aug.crop_scale), crop_ratio=tuple(aug.crop_ratio), flip=aug.flip)


def _global_batch(mesh, batch):
  sh = partitioning.batch_sharding(mesh)
  keys = ("image", "text", "neg_text", "teacher_text", "teacher_image_emb", "teacher_text_emb")
  return {k: jax.make_array_from_process_local_data(sh, batch[k]) for k in keys if k in batch}


def train(cfg, workdir, *, stop_after_step=None, progress=True, devices=None):
  """Train (or resume) to `cfg.total_steps`; returns the final evaluation result.

  `stop_after_step` ends the run early without saving, as a kill would (used by the resume
  test); `devices` restricts the mesh to a subset of the devices (default: all).
  SIGTERM/SIGINT/SIGUSR1 save the current step and raise errors.Preempted; a non-finite loss
  or gradient raises health.Diverged with the latest checkpoint untouched.
  """
  workdir = storage.absolute(workdir)  # local, or a bucket (gs://...)
  cfg = absolute_data_dirs(cfg)
  exp = Experiment(cfg, devices)
  exp.check_attention()  # before anything compiles or the workdir is made
  check_hard_negatives(cfg.data.dir, cfg.data.train_split, cfg.data.hard_negatives)
  distill, teacher = distillation(exp, cfg)  # a bad teacher fails here, nothing written
  storage.makedirs(workdir)
  # One trainer per workdir: process 0 holds the lock for the whole job.
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, PreemptionGuard() as guard:
    return _train(exp, cfg, workdir, guard, stop_after_step, progress, distill, teacher)


def distillation(exp, cfg):
  """(loss.distill as the step takes it, the online Teacher), or (None, None) without one."""
  d, distill = cfg.loss.distill, distill_options(cfg)
  if distill is None:
    return None, None
  if d.source == "offline":
    check_teacher_records(cfg.data.dir, cfg.data.train_split, d.teacher, cfg.model.image.size)
    return distill, None
  return distill, load_teacher(d.teacher, exp.mesh, exp.rules, exp.tokenizer_path,
                               cfg.model.text.max_len)


def _train(exp, cfg, workdir, guard, stop_after_step, progress, distill=None, teacher=None):
  check_workdir_config(workdir, cfg)
  evaluate = build_evaluator(exp)  # checks every eval set's data now, before any step
  ckpt = Checkpointer(workdir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                      async_save=cfg.checkpoint.async_save)
  data = train_iterator(cfg.data.dir, batch_size=cfg.batch_size // jax.process_count(),
                        text_len=cfg.model.text.max_len, seed=cfg.seed,
                        image_size=cfg.model.image.size, augment=train_augment(cfg.data),
                        mixture=parse_mixture(cfg.data.mixture),
                        split=cfg.data.train_split, workers=cfg.data.workers,
                        hard_negatives=cfg.data.hard_negatives,
                        teacher_tokens=(teacher.tokenizer_path, teacher.text_len)
                        if teacher is not None and teacher.own_tokens else None,
                        teacher_views=distill is not None and teacher is None)
  start, state = ckpt.restore_latest(exp.abstract_state, data)
  if start is None:
    start = 0
    state = init_state(exp.model, exp.tx, exp.mesh, cfg.model.image.size, cfg.seed, exp.state_sh,
                       exp.rules)
    if cfg.model.init_from:
      state = state.replace(params=load_initial_params(
          cfg.model.init_from, exp.abstract_state.params, exp.state_sh.params, cfg.model.scan,
          cfg.model.image, rules=cfg.optim.rules, fresh=state.params))
  if jax.process_index() == 0:
    write_run_config(workdir, cfg)
    save_run_files(workdir, cfg, cfg.data.dir, exp.manifest)
    if start:
      print(f"resuming {workdir} from step {start}", flush=True)

  writer = MetricWriter(workdir, resume_step=start)
  step_fn = make_train_step(exp.model, exp.loss, exp.tx, exp.schedule, exp.mesh, exp.state_sh,
                            cfg.optim.grad_accum_steps, rules=exp.rules,
                            frozen=param_setting(cfg.optim, exp.abstract_state.params, "frozen"),
                            negatives=cfg.data.hard_negatives > 0, distill=distill,
                            teacher=teacher)
  bar = tqdm.tqdm(total=cfg.total_steps, initial=start, disable=not progress or
                  jax.process_index() != 0, desc=f"train {cfg.loss.name}", unit="step",
                  dynamic_ncols=True)
  t0, last_logged = time.perf_counter(), start
  step = start
  health = Health(cfg.optim.skip_nonfinite)
  last_good = lambda: (ckpt.wait(), ckpt.latest_step())[1]  # noqa: E731
  try:
    while step < cfg.total_steps:
      state, metrics = step_fn(state, _global_batch(exp.mesh, next(data)))
      step += 1
      health.update(step, metrics)
      preempted = guard.reached(step)  # every step, on every process (a collective decision)
      if preempted or step == cfg.total_steps or ckpt.due(step):
        health.check(last_good)  # a non-finite step since the last save stops before saving
        ckpt.save(step, state, data, force=True)
      if step % cfg.log_every == 0 or step == cfg.total_steps:
        health.check(last_good)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        metrics["examples_per_s"] = cfg.batch_size * (step - last_logged) / (now - t0)
        metrics["data/skipped"] = skipped_total(data)  # broken records so far (cumulative)
        if cfg.optim.skip_nonfinite:
          metrics["optim/skipped_total"] = health.total
        t0, last_logged = now, step
        writer.write(step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", ex_s=f"{metrics['examples_per_s']:.0f}",
                        **({"skipped": metrics["data/skipped"]} if metrics["data/skipped"] else {}))
      bar.update(1)
      if preempted:
        raise Preempted(guard.received, step)
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
  """The primary Recall@K as eval/{i2t,t2i}_R@K; every scoring, zero-shot view and
  compositional swap type below it; named sets' the same below eval/NAME/."""
  if "sets" in result:
    return {f"eval/{name}/{k[len('eval/'):]}": v for name, r in result["sets"].items()
            for k, v in _eval_scalars(r).items()}
  out = {f"eval/{d}_{k}": v for d in ("i2t", "t2i") if d in result for k, v in result[d].items()}
  for name, v in result.get("retrieval", {}).items():
    out[f"eval/{name}/rsum"] = v["rsum"]
    out.update({f"eval/{name}/{d}_{k}": x for d in ("i2t", "t2i") for k, x in v[d].items()})
  for view, z in result.get("zeroshot", {}).items():
    if isinstance(z, dict):
      out.update({f"eval/zeroshot_{view}/{k}": x for k, x in z.items() if k.startswith("top")})
  for kind, c in result.get("compositional", {}).items():
    if isinstance(c, dict) and c["accuracy"] is not None:
      out[f"eval/compositional_{kind}/accuracy"] = c["accuracy"]
  return out

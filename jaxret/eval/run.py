"""`jaxret eval --workdir DIR [--step N]`: restore a checkpoint with the run's saved config
and run the evaluations it names (no data iterator, no optimizer step); writes eval.json and
plots/ in the workdir. `jaxret plot --workdir DIR` redraws the plots."""
import os

import jax

from jaxret.eval.plots import plot_workdir
from jaxret.eval.report import format_table, write_result
from jaxret.eval.suite import build_evaluator, check_tasks
from jaxret.experiment import Experiment
from jaxret.workdir import load_run_config, restore_params


def evaluate_workdir(workdir, step=None, tasks=None, data_dir=None):
  """`tasks` (names) and `data_dir` replace the run config's eval.tasks and data.dir."""
  workdir = os.path.abspath(workdir)
  cfg = load_run_config(workdir)
  if tasks:
    cfg.eval.tasks = check_tasks(tuple(tasks))
  if data_dir:
    cfg.data.dir = data_dir
  exp = Experiment(cfg)
  params, step = restore_params(exp.abstract_state, workdir, step)
  result = build_evaluator(exp)(params, step)
  write_result(workdir, result)
  print(format_table(result), flush=True)
  if jax.process_index() == 0:
    for path in plot_workdir(workdir):
      print(f"wrote {path}", flush=True)
  return result

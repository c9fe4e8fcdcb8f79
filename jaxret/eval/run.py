"""`jaxret eval --workdir DIR [--step N]`: restore a checkpoint with the run's saved config
and run the evaluations it names (no data iterator, no optimizer step); writes eval.json and
plots/ in the workdir. `jaxret plot --workdir DIR` redraws the plots."""
import os

import jax

from jaxret import config
from jaxret.errors import UserError
from jaxret.eval.plots import plot_workdir
from jaxret.eval.report import format_table, write_result


def load_run_config(workdir):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"'{workdir}' holds no jaxret run (no config.json): pass the --workdir "
                    "that `jaxret train` wrote")
  with open(path) as f:
    return config.from_json(f.read())


def restore_params(exp, workdir, step=None):
  """-> (params, step) from a workdir's checkpoint, in the experiment's shardings."""
  from jaxret.train.checkpoint import Checkpointer
  ckpt = Checkpointer(workdir, every=0, keep=None, async_save=False)
  steps = ckpt.all_steps()
  if not steps:
    raise UserError(f"'{workdir}' has no checkpoints yet: train first, or pick another workdir")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise UserError(f"'{workdir}' has no checkpoint at step {step}; available: "
                    f"{', '.join(map(str, sorted(steps)))}")
  state = ckpt.restore_state(step, exp.abstract_state)
  ckpt.close()
  return state.params, step


def evaluate_workdir(workdir, step=None, tasks=None, data_dir=None):
  """`tasks` (names) and `data_dir` replace the run config's eval.tasks and data.dir."""
  from jaxret.eval.suite import check_tasks
  from jaxret.train.loop import Experiment
  workdir = os.path.abspath(workdir)
  cfg = load_run_config(workdir)
  if tasks:
    cfg.eval.tasks = check_tasks(tuple(tasks))
  if data_dir:
    cfg.data.dir = data_dir
  exp = Experiment(cfg)
  params, step = restore_params(exp, workdir, step)
  result = exp.evaluator()(params, step)
  write_result(workdir, result)
  print(format_table(result), flush=True)
  if jax.process_index() == 0:
    for path in plot_workdir(workdir):
      print(f"wrote {path}", flush=True)
  return result

"""`jaxret eval --workdir DIR [--step N]`: restore a checkpoint with the run's saved config
and evaluate it (no data iterator, no optimizer step)."""
import os

from jaxret import config
from jaxret.errors import UserError
from jaxret.eval.retrieval import format_table, write_result


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


def evaluate_workdir(workdir, step=None):
  from jaxret.train.loop import Experiment
  workdir = os.path.abspath(workdir)
  exp = Experiment(load_run_config(workdir))
  params, step = restore_params(exp, workdir, step)
  result = exp.evaluator()(params, step)
  write_result(workdir, result)
  print(format_table(result), flush=True)
  return result

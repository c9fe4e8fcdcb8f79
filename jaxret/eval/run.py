"""`jaxret eval --workdir DIR [--step N]`: restore a checkpoint with the run's saved config
and run the evaluations it names (no data iterator, no optimizer step); writes eval.json and
plots/ in the workdir. `jaxret plot --workdir DIR` redraws the plots."""
import jax

from jaxret import config, storage
from jaxret.eval.plots import plot_workdir
from jaxret.eval.report import format_table, write_result
from jaxret.eval.suite import build_evaluator, check_tasks
from jaxret.experiment import Experiment
from jaxret.workdir import load_run_config, restore_params, run_tokenizer_path


def eval_on_devices(cfg, devices=None):
  """Fits the run's mesh to the devices at hand (in place): its fsdp and tensor axes if they
  divide the device count, else plain data parallelism; orbax reshards the checkpoint."""
  n = len(devices) if devices is not None else jax.device_count()
  model_axes = max(cfg.mesh.fsdp, 1) * max(cfg.mesh.tensor, 1)
  with cfg.unlocked():
    if n % model_axes:
      print(f"eval: the run's mesh (fsdp={cfg.mesh.fsdp}, tensor={cfg.mesh.tensor}) does not fit "
            f"{n} device(s); evaluating data-parallel", flush=True)
      cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    else:
      cfg.mesh.data = -1
    cfg.batch_size = n  # no training step: any multiple of the batch-parallel devices


def evaluate_workdir(workdir, step=None, tasks=None, data_dir=None, devices=None):
  """`tasks` (names) and `data_dir` replace the run config's eval.tasks and data.dir; the
  checkpoint is restored onto `devices` (default: all), whatever mesh trained it."""
  workdir = storage.absolute(workdir)
  cfg = load_run_config(workdir)
  if tasks:
    cfg.eval.tasks = check_tasks(tuple(tasks))
  if data_dir:
    cfg.data.dir = storage.absolute(data_dir)
    config.check_local_data(cfg)  # a gs:// --data-dir: one line saying to mount it
  eval_on_devices(cfg, devices)
  # The run's own tokenizer, whichever data it is evaluated on.
  exp = Experiment(cfg, devices, tokenizer_path=run_tokenizer_path(workdir, cfg))
  params, step = restore_params(exp.abstract_state, workdir, step)
  result = build_evaluator(exp)(params, step)
  write_result(workdir, result)
  print(format_table(result), flush=True)
  if jax.process_index() == 0:
    for path in plot_workdir(workdir):
      print(f"wrote {path}", flush=True)
  return result

"""PNG plots of a workdir: Recall@K curves (eval.json) and training curves (metrics.jsonl).

`jaxret plot --workdir DIR` (re)writes DIR/plots/recall_at_k.png and DIR/plots/training.png;
`jaxret eval` writes them too.
"""
import json
import os

from jaxret.errors import UserError
from jaxret.eval.report import VARIANT_NAMES


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # files only; no display on training machines
  import matplotlib.pyplot as plt
  return plt


def recall_curves(result, path):
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, d, title in zip(axes, ("i2t", "t2i"), ("image -> text", "text -> image")):
    for name, v in result.get("retrieval", {}).items():
      curve = v["curve"][d]
      ax.plot(range(1, len(curve) + 1), [100 * x for x in curve], marker=".", markersize=3,
              label=f"{VARIANT_NAMES.get(name, name)} (R@1 {100 * v[d]['R@1']:.1f})")
    ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel("K")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  axes[0].set_ylabel("Recall@K (%)")
  fig.suptitle(f"retrieval on '{result['split']}' at step {result['step']}: "
               f"{result.get('num_images')} images, {result.get('num_captions')} captions")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def training_curves(rows, path):
  """Loss (and the temperature) per step; primary Recall@K and zero-shot per evaluation."""
  plt = _pyplot()
  train = [r for r in rows if "loss" in r]
  evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  ax = axes[0]
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  ax.set_title("training loss")
  ax = axes[1]
  keys = [k for k in ("eval/i2t_R@1", "eval/t2i_R@1", "eval/i2t_R@5", "eval/t2i_R@5",
                      "eval/zeroshot_item/top1", "eval/zeroshot_scene/top1")
          if any(k in r for r in evals)]
  for k in keys:
    pts = [(r["step"], 100 * r[k]) for r in evals if k in r]
    ax.plot(*zip(*pts), marker="o", label=k.replace("eval/", ""))
  steps = [r["step"] for r in rows]
  if steps:  # the same step range as the loss, also when there is one evaluation
    ax.set_xlim(0, max(steps) * 1.03)
  ax.set_xlabel("step")
  ax.set_ylabel("%")
  ax.set_title("evaluation (held-out split)")
  ax.grid(True, alpha=0.3)
  if keys:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_workdir(workdir):
  """-> paths of the PNGs written under workdir/plots."""
  out_dir = os.path.join(workdir, "plots")
  written = []
  eval_path, metrics_path = (os.path.join(workdir, n) for n in ("eval.json", "metrics.jsonl"))
  if not os.path.exists(eval_path) and not os.path.exists(metrics_path):
    raise UserError(f"'{workdir}' has neither eval.json nor metrics.jsonl: pass the --workdir "
                    "that `jaxret train` or `jaxret eval` wrote")
  os.makedirs(out_dir, exist_ok=True)
  if os.path.exists(eval_path):
    with open(eval_path) as f:
      result = json.load(f)
    if result.get("retrieval"):  # results written before multi-caption eval have no curves
      written.append(os.path.join(out_dir, "recall_at_k.png"))
      recall_curves(result, written[-1])
  if os.path.exists(metrics_path):
    rows = []
    with open(metrics_path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:  # a line torn by a killed run (the writer drops it on resume)
          continue
    written.append(os.path.join(out_dir, "training.png"))
    training_curves(rows, written[-1])
  return written

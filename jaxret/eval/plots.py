"""PNG plots of a workdir: Recall@K curves (eval.json) and training curves (metrics.jsonl).

`jaxret plot --workdir DIR` (re)writes DIR/plots/recall_at_k.png and DIR/plots/training.png;
`jaxret eval` writes them too. With named evaluation sets (eval.sets) each set gets its own
recall_at_k_NAME.png, and training.png draws each set's R@1, zero-shot top-1 and compositional
accuracy under its name.
"""
import io
import json

from jaxret import storage
from jaxret.workdir import read_jsonl
from jaxret.errors import UserError
from jaxret.eval.report import VARIANT_NAMES


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # files only; no display on training machines
  import matplotlib.pyplot as plt
  return plt


def recall_plots(result, out_dir):
  """-> [(result of one set, path of its PNG)]: recall_at_k.png, or one per named set."""
  if "sets" in result:
    return [({**r, "set": name}, storage.join(out_dir, f"recall_at_k_{name}.png"))
            for name, r in result["sets"].items() if r.get("retrieval")]
  # results written before multi-caption eval have no curves
  return [(result, storage.join(out_dir, "recall_at_k.png"))] if result.get("retrieval") else []


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
  where = f"'{result['split']}'"
  if "set" in result:
    where = f"set '{result['set']}' ('{result['data_dir']}' split {where})"
  fig.suptitle(f"retrieval on {where} at step {result['step']}: "
               f"{result.get('num_images')} images, {result.get('num_captions')} captions")
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def training_curves(rows, path):
  """Loss (and the temperature) per step; primary Recall@K, zero-shot and compositional
  accuracy per evaluation."""
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
  shown = ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "zeroshot_image/top1",
           "zeroshot_item/top1", "zeroshot_scene/top1", "compositional_attribute/accuracy",
           "compositional_object/accuracy", "compositional_relation/accuracy")
  keys = [k for k in [f"eval/{x}" for x in shown]
          + [f"eval/{n}/{x}" for n in _set_names(evals) for x in shown if "@5" not in x]
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
  _save(fig, path)
  plt.close(fig)


def _set_names(rows):
  """The named sets of metric rows, in order: eval/NAME/i2t_R@1, eval/NAME/zeroshot_V/top1 or
  eval/NAME/compositional_T/accuracy (eval/pooled/i2t_R@1 is a scoring of the unnamed set,
  eval/zeroshot_item/top1 its zero-shot)."""
  names = {}
  for r in rows:
    for k in r:
      p = k.split("/")
      if p[0] == "eval" and ((len(p) == 3 and p[2] == "i2t_R@1")
                             or (len(p) == 4 and p[2].startswith(("zeroshot_",
                                                                  "compositional_")))):
        names.setdefault(p[1])
  return [n for n in names if n not in VARIANT_NAMES]


def _save(fig, path):
  """PNG bytes to `path`, local or in a bucket (matplotlib writes local files only)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  storage.write_bytes(path, buf.getvalue())


def plot_workdir(workdir):
  """-> paths of the PNGs written under workdir/plots."""
  out_dir = storage.join(workdir, "plots")
  written = []
  eval_path, metrics_path = (storage.join(workdir, n) for n in ("eval.json", "metrics.jsonl"))
  has_eval, has_metrics = storage.exists(eval_path), storage.exists(metrics_path)
  if not has_eval and not has_metrics:
    raise UserError(f"'{workdir}' has neither eval.json nor metrics.jsonl: pass the --workdir "
                    "that `jaxret train` or `jaxret eval` wrote")
  storage.makedirs(out_dir)
  if has_eval:
    result = json.loads(storage.read_text(eval_path))
    for one, path in recall_plots(result, out_dir):
      written.append(path)
      recall_curves(one, path)
  if has_metrics:
    written.append(storage.join(out_dir, "training.png"))
    training_curves(read_jsonl(metrics_path), written[-1])
  return written

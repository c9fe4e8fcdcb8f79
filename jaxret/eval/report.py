"""The printed table and eval.json of an evaluation result (see suite.py for its layout)."""
import json
import os

import jax

VARIANT_NAMES = {
    "pooled": "pooled cosine",
    "pooled_qb_norm": "+ QB-Norm",
    "pooled_db_norm": "+ DBNorm",
    "filip_exact": "FILIP exact",
    "filip_rerank": "FILIP rerank",
}


def format_table(result, title=None):
  """Recall@K in percent, mean/median rank (1 = best) and rsum per scoring; zero-shot."""
  keys = list(result["i2t"])
  n_img, n_txt = result.get("num_images", result["num_pairs"]), result.get("num_captions")
  lines = [title or (f"evaluation on '{result['split']}' at step {result['step']}: {n_img} images"
                     + (f", {n_txt} captions" if n_txt else "")
                     + f", primary scoring {result.get('primary', result['similarity'])}")]
  variants = result.get("retrieval")
  if not variants:  # a bare retrieval result
    variants = {"": {"i2t": result["i2t"], "t2i": result["t2i"]}}
  head = f"{'scoring':<15}{'dir':<5}" + "".join(f"{k:>8}" for k in keys)
  lines.append(head + f"{'MeanR':>8}{'MedR':>7}{'rsum':>8}")
  for name, v in variants.items():
    for d in ("i2t", "t2i"):
      row = f"{VARIANT_NAMES.get(name, name) if d == 'i2t' else '':<15}{d:<5}"
      row += "".join(f"{100 * v[d][k]:>7.1f}%" for k in keys)
      if "mean_rank" in v[d]:
        row += f"{v[d]['mean_rank']:>8.1f}{v[d]['median_rank']:>7.1f}"
        row += f"{v['rsum']:>8.1f}" if d == "i2t" else ""
      lines.append(row)
    if "same_rank_as_exact" in v:
      same = v["same_rank_as_exact"]
      lines.append(f"{'':<15}rerank top-{v['k']}: same rank as exact for "
                   f"{100 * same['i2t']:.1f}% (i2t) / {100 * same['t2i']:.1f}% (t2i) of queries")
  zs = result.get("zeroshot")
  if zs:
    lines.append(f"zero-shot, {zs['num_classes']} classes x {zs['num_templates']} templates"
                 "  (chance in brackets)")
    for view in ("scene", "item"):
      if view in zs:
        z = zs[view]
        tops = [k for k in z if k.startswith("top")]
        lines.append(f"  {view:<6}({z['num_images']} images) " + "  ".join(
            f"{k} {100 * z[k]:.1f}% [{100 * z['chance'][k]:.1f}%]" for k in tops))
  return "\n".join(lines)


def write_result(workdir, result):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=2)

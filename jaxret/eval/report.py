"""The printed table and eval.json of an evaluation result (see suite.py for its layout)."""
import json

import jax

from jaxret import storage

VARIANT_NAMES = {
    "pooled": "pooled cosine",
    "pooled_qb_norm": "+ QB-Norm",
    "pooled_db_norm": "+ DBNorm",
    "filip_exact": "FILIP exact",
    "filip_rerank": "FILIP rerank",
}


def format_table(result, title=None):
  """Recall@K in percent, mean/median rank (1 = best) and rsum per scoring; zero-shot;
  compositional accuracy. A
  result of several named sets is one such table per set, under its name."""
  if "sets" in result:
    return "\n\n".join(
        format_table(r, title=f"evaluation of set '{name}' ('{r.get('data_dir')}' split "
                              f"'{r['split']}') at step {r['step']}" + _counts(r))
        for name, r in result["sets"].items())
  lines = [title or (f"evaluation on '{result['split']}' at step {result['step']}"
                     + _counts(result))]
  if "i2t" in result:
    lines += _retrieval_rows(result)
  lines += _zeroshot_rows(result.get("zeroshot"))
  lines += _compositional_rows(result.get("compositional"))
  for task, why in result.get("skipped", {}).items():
    lines.append(f"{task} skipped: {why}")
  return "\n".join(lines)


def _counts(result):
  n_img, n_txt = result.get("num_images", result["num_pairs"]), result.get("num_captions")
  out = f": {n_img} images" + (f", {n_txt} captions" if n_txt else "")
  if "i2t" in result:
    out += f", primary scoring {result.get('primary', result['similarity'])}"
  return out


def _retrieval_rows(result):
  keys = list(result["i2t"])
  lines = []
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
  return lines


def _zeroshot_rows(zs):
  if not zs:
    return []
  lines = [f"zero-shot, {zs['num_classes']} classes x {zs['num_templates']} templates"
           "  (chance in brackets)"]
  for view in ("image", "scene", "item"):
    if view in zs:
      z = zs[view]
      tops = [k for k in z if k.startswith("top")]
      lines.append(f"  {view:<6}({z['num_images']} images) " + "  ".join(
          f"{k} {100 * z[k]:.1f}% [{100 * z['chance'][k]:.1f}%]" for k in tops))
  return lines


def _compositional_rows(comp):
  if not comp:
    return []
  lines = ["compositional: true caption vs swapped variants  (chance in brackets)"]
  for name, c in comp.items():
    if not isinstance(c, dict):
      continue
    if c["accuracy"] is None:
      lines.append(f"  {name:<10}no variants ({c['no_variants']} images)")
      continue
    lines.append(f"  {name:<10}{100 * c['accuracy']:5.1f}% [{100 * c['chance']:.1f}%]  "
                 f"({c['images']} images, {c['pairs']} pairs)")
  if comp.get("mean") is not None:
    lines.append(f"  {'mean':<10}{100 * comp['mean']:5.1f}%")
  return lines


def write_result(workdir, result):
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, "eval.json"), json.dumps(result, indent=2))

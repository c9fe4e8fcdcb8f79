"""`python -m jaxret.eval.compare RUN_DIR...`: one table of the final retrieval results of
several runs (the end of `make demo`), with compositional accuracy per swap type where a run has
it ("-" where not); runs evaluated on several named sets (eval.sets) get one table per set."""
import json
import os
import sys

# jaxret.eval.compositional.TYPES, written out: this table imports nothing that loads JAX.
COMPOSITIONAL = ("attribute", "object", "relation")


def _by_set(result):
  """eval.json -> {set name (None: the one default set): its result}."""
  return dict(result["sets"]) if "sets" in result else {None: result}


def compare_table(workdirs):
  runs = []
  for w in workdirs:
    with open(os.path.join(w, "eval.json")) as f:
      runs.append((os.path.basename(os.path.normpath(w)), _by_set(json.load(f))))
  names = list(dict.fromkeys(n for _, sets in runs for n in sets))
  tables = [_table(name, [(run, sets[name]) for run, sets in runs if name in sets])
            for name in names]
  return "\n\n".join(t for t in tables if t)


def _table(set_name, rows):
  rows = [(run, r) for run, r in rows if "i2t" in r]  # retrieval may be off for a set
  if not rows:
    return ""
  keys = list(rows[0][1]["i2t"])
  n, captions = rows[0][1]["num_pairs"], rows[0][1].get("num_captions")
  comp = any("compositional" in r for _, r in rows)
  head = (f"{'run':<16}{'scores':<18}" + "".join(f"{'i2t ' + k:>10}" for k in keys)
          + "".join(f"{'t2i ' + k:>10}" for k in keys)
          + ("".join(f"{t:>11}" for t in COMPOSITIONAL) if comp else ""))
  what = f"{n} images, {captions} captions" if captions else f"{n} image-caption pairs"
  title = f"held-out retrieval{f' on {set_name}' if set_name else ''}, {what}"
  chance = f"chance t2i R@1 = {100 / n:.2f}%" + ("; compositional 50%" if comp else "")
  lines = [f"{title} ({chance})", head]
  for name, r in rows:
    lines.append(f"{name:<16}{r.get('primary', r['similarity']):<18}"
                 + "".join(f"{100 * r['i2t'][k]:>9.1f}%" for k in keys)
                 + "".join(f"{100 * r['t2i'][k]:>9.1f}%" for k in keys)
                 + ("".join(_accuracy(r, t) for t in COMPOSITIONAL) if comp else ""))
  return "\n".join(lines)


def _accuracy(result, kind):
  acc = result.get("compositional", {}).get(kind, {}).get("accuracy")
  return f"{'-':>11}" if acc is None else f"{100 * acc:>10.1f}%"


if __name__ == "__main__":
  print(compare_table(sys.argv[1:]))

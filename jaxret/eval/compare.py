"""`python -m jaxret.eval.compare RUN_DIR...`: one table of the final retrieval results of
several runs (the end of `make demo`)."""
import json
import os
import sys


def compare_table(workdirs):
  rows = []
  for w in workdirs:
    with open(os.path.join(w, "eval.json")) as f:
      r = json.load(f)
    rows.append((os.path.basename(os.path.normpath(w)), r))
  keys = list(rows[0][1]["i2t"])
  n = rows[0][1]["num_pairs"]
  head = (f"{'run':<16}{'scores':<18}" + "".join(f"{'i2t ' + k:>10}" for k in keys)
          + "".join(f"{'t2i ' + k:>10}" for k in keys))
  lines = [f"held-out retrieval, {n} image-caption pairs (chance R@1 = {100 / n:.2f}%)", head]
  for name, r in rows:
    lines.append(f"{name:<16}{r['similarity']:<18}"
                 + "".join(f"{100 * r['i2t'][k]:>9.1f}%" for k in keys)
                 + "".join(f"{100 * r['t2i'][k]:>9.1f}%" for k in keys))
  return "\n".join(lines)


if __name__ == "__main__":
  print(compare_table(sys.argv[1:]))

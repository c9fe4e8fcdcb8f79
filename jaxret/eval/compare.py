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
  n, captions = rows[0][1]["num_pairs"], rows[0][1].get("num_captions")
  head = (f"{'run':<16}{'scores':<18}" + "".join(f"{'i2t ' + k:>10}" for k in keys)
          + "".join(f"{'t2i ' + k:>10}" for k in keys))
  what = f"{n} images, {captions} captions" if captions else f"{n} image-caption pairs"
  lines = [f"held-out retrieval, {what} (chance t2i R@1 = {100 / n:.2f}%)", head]
  for name, r in rows:
    lines.append(f"{name:<16}{r.get('primary', r['similarity']):<18}"
                 + "".join(f"{100 * r['i2t'][k]:>9.1f}%" for k in keys)
                 + "".join(f"{100 * r['t2i'][k]:>9.1f}%" for k in keys))
  return "\n".join(lines)


if __name__ == "__main__":
  print(compare_table(sys.argv[1:]))

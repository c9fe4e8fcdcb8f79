"""The import graph of jaxret is layered (DESIGN.md, "Layout"): each module imports only the
layers below its own, eval and export never import the training loop, and there are no cycles.

Every import counts, at module level or inside a function: a function-level import hides a
cycle from Python, not from a reader.
"""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module matches the first pattern that fits; a new module must be placed here.
LAYERS = [
    ("base", r"jaxret\.(errors|config|param_rules|hugepages|storage)"),
    ("stages", r"jaxret\.(models|losses|data|parallel)(\..*)?|jaxret\.optim"),
    ("run", r"jaxret\.(experiment|workdir|checkpoint|lock)"),
    ("uses", r"jaxret\.(train|eval|export|inference)(\..*)?"),
    ("front", r"jaxret|jaxret\.cli"),
]
# Within a layer, who may import whom (group -> groups); anything else in the layer is refused.
SAME_LAYER = {
    "config": {"errors"},
    "workdir": {"checkpoint"},
    "train": {"eval", "inference"},  # runs the evaluator, loads a teacher; never the reverse
    "inference": {"eval", "export"},  # embeds as eval does, loads exports; never trains
}


def modules():
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, "jaxret")):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
  return out


def imports(path, known):
  """The jaxret modules a file imports, anywhere in it."""
  tree = ast.parse(open(path).read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      while name not in known and "." in name:  # `from jaxret.x import f`: the module jaxret.x
        name = name.rsplit(".", 1)[0]
      if name in known and name.startswith("jaxret"):
        found.add(name)
  return found


def layer(mod):
  for i, (_, pattern) in enumerate(LAYERS):
    if re.fullmatch(pattern, mod):
      return i
  raise AssertionError(f"module {mod} is in no layer: add it to LAYERS in {__file__}")


def group(mod):
  return mod.split(".")[1] if "." in mod else mod


def graph():
  known = modules()
  return {m: imports(p, known) - {m} for m, p in known.items()}


def test_each_module_imports_only_lower_layers():
  bad = []
  for mod, deps in graph().items():
    for dep in deps:
      lm, ld = layer(mod), layer(dep)
      same_group = group(mod) == group(dep)
      if ld > lm or (ld == lm and not same_group and group(dep) not in SAME_LAYER.get(group(mod), ())):
        bad.append(f"{mod} ({LAYERS[lm][0]}) imports {dep} ({LAYERS[ld][0]})")
  assert not bad, "\n".join(sorted(bad))


def test_eval_and_export_never_reach_the_training_loop():
  g = graph()

  def reach(start):
    seen, todo = set(), [start]
    while todo:
      for dep in g[todo.pop()] - seen:
        seen.add(dep)
        todo.append(dep)
    return seen

  for mod in g:
    if group(mod) in ("eval", "export"):
      trained = sorted(d for d in reach(mod) if group(d) == "train")
      assert not trained, f"{mod} reaches {trained}"


def test_no_import_cycles():
  g = graph()
  state = {}

  def visit(m, stack):
    state[m] = "open"
    for d in sorted(g[m]):
      if state.get(d) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d, stack + [d])
    state[m] = "done"

  for m in sorted(g):
    if m not in state:
      visit(m, [m])


def test_the_checker_sees_function_level_imports(tmp_path):
  """A positive control: an import inside a function is found, as the rules need."""
  f = tmp_path / "m.py"
  f.write_text("def f():\n  from jaxret.train.loop import train\n  import jaxret.eval.run\n")
  known = modules()
  assert imports(str(f), known) == {"jaxret.train.loop", "jaxret.eval.run"}

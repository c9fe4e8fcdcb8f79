"""Parameters by path: the one regex-over-parameter-paths mechanism.

A parameter's path is its '/'-joined key path ('image/encoder/block_0/attn/query/kernel').
The optimizer (frozen parameters, learning-rate and weight-decay multipliers), partial loading
(`model.init_from`), checkpoint checks, import and export all name parameters this way.
"""
import re

import jax


def param_paths(tree):
  """The same tree with each leaf replaced by its '/'-joined path ('image/encoder/.../kernel')."""
  def name(path, _):
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
  return jax.tree_util.tree_map_with_path(name, tree)


def regex_mask(tree, pattern):
  """True where a leaf's path matches `pattern` (full match)."""
  rx = re.compile(pattern)
  return jax.tree.map(lambda p: bool(rx.fullmatch(p)), param_paths(tree))


def rule_setting(tree, rules, name, default):
  """One setting per leaf under `rules` ((regex, {setting: value}), ...): the first rule whose
  regex fully matches the leaf's path decides (big_vision's first match wins), per parameter: if
  that rule does not name `name`, the leaf gets `default(path)`; later rules are not consulted.
  Leaves no rule matches get `default(path)` too. Works on arrays, abstract arrays, and on the
  masked trees optax hands to inner transformations (masked-out leaves have no path)."""
  compiled = [(re.compile(regex), settings) for regex, settings in rules]

  def one(path):
    for rx, settings in compiled:
      if rx.fullmatch(path):
        return settings[name] if name in settings else default(path)
    return default(path)
  return jax.tree.map(one, param_paths(tree))

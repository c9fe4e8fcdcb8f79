"""Parameters by path: the one regex-over-parameter-paths mechanism.

A parameter's path is its '/'-joined key path ('image/encoder/block_0/attn/query/kernel').
The optimizer (weight decay), checkpoint checks, import and export all name parameters this way.
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

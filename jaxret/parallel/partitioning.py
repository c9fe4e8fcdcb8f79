"""Logical axis names -> mesh axes, and the shardings that follow for params and batches.

Models annotate with logical names only; the rules that map them are config data
(`mesh.rules`, default `jaxret.config.MESH_RULES`). Rules are tried in order and a mesh axis is
used at most once per array. Parameters ('embed', 'mlp', 'heads', ...) and activations
('act_batch', 'act_embed', 'act_mlp', ...) have names of their own, so the rules for one can
change without moving the other.
"""
import contextlib
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxret.config import MESH_RULES
from jaxret.errors import UserError, did_you_mean
from jaxret.param_rules import param_paths
from jaxret.parallel.mesh import BATCH_AXES

DEFAULT_RULES = MESH_RULES
log = logging.getLogger("jaxret")


def check_logical_names(rules, known):
  """Every logical name in `rules` is one the models use (`known`): a rule for a misspelled
  name would otherwise be ignored without a word and its dimension replicated."""
  for name, axes in rules:
    if name not in known:
      raise UserError(f"mesh.rules: ({name!r}, {axes!r}): the models use no logical axis "
                      f"'{name}'{did_you_mean(name, known)}; they use {', '.join(known)}")


def _is_boxed(x):
  return isinstance(x, nn.Partitioned)


def logical_shardings(abstract_boxed, mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of flax LogicallyPartitioned leaves (e.g. eval_shape(init)).

  A dimension that does not divide evenly over its mesh axes (a 45-word vocabulary over
  tensor=2) is replicated instead: XLA cannot place uneven shards of a parameter. `undivided`
  lists those dimensions.
  """
  def one(leaf):
    if not _is_boxed(leaf):
      return NamedSharding(mesh, P())
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    return NamedSharding(mesh, fit_spec(spec, leaf.value.shape, mesh))

  return jax.tree.map(one, abstract_boxed, is_leaf=_is_boxed)


def _dims(spec, shape):
  """(dimension index, size, the spec's entry, its mesh axes as a tuple) per dimension."""
  padded = tuple(spec) + (None,) * (len(shape) - len(spec))
  for i, (dim, entry) in enumerate(zip(shape, padded)):
    yield i, dim, entry, (entry,) if isinstance(entry, str) else tuple(entry or ())


def fit_spec(spec, shape, mesh):
  """`spec` with every mesh axis dropped from dimensions it does not divide."""
  return P(*(entry if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0 else None
             for _, dim, entry, axes in _dims(spec, shape)))


def undivided(abstract_boxed, mesh, rules=DEFAULT_RULES):
  """The dimensions the rules ask to split that their mesh axes do not divide, one dict per
  (parameter path, dimension): what `logical_shardings` replicated instead, and its cost."""
  names = jax.tree.leaves(param_paths(nn.unbox(abstract_boxed)))
  leaves = jax.tree.leaves(abstract_boxed, is_leaf=_is_boxed)
  out = []
  for path, leaf in zip(names, leaves):
    if not _is_boxed(leaf):
      continue
    shape, dtype = leaf.value.shape, leaf.value.dtype
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    held = NamedSharding(mesh, fit_spec(spec, shape, mesh)).shard_shape(shape)
    for i, dim, _, axes in _dims(spec, shape):
      split = math.prod(mesh.shape[a] for a in axes)
      if axes and dim % split:
        nbytes = math.prod(held) * jnp.dtype(dtype).itemsize
        out.append(dict(path=path, shape=tuple(shape), dtype=str(jnp.dtype(dtype)), dim=i,
                        size=dim, axes=axes, axis_sizes=tuple(mesh.shape[a] for a in axes),
                        bytes_per_device=nbytes, bytes_if_divided=nbytes // split))
  return out


def _bytes(n):
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n} B"


def describe_undivided(r):
  """One line for one undivided dimension (the log line and `jaxret inspect`'s table)."""
  over = " x ".join(f"{a}={s}" for a, s in zip(r["axes"], r["axis_sizes"]))
  return (f"{r['path']} {list(r['shape'])} {r['dtype']}: dimension {r['dim']} ({r['size']}) is "
          f"not divisible by {over}, replicated there instead: "
          f"{_bytes(r['bytes_per_device'])} per device instead of "
          f"{_bytes(r['bytes_if_divided'])} (+{_bytes(r['bytes_per_device'] - r['bytes_if_divided'])}"
          ", before optimizer moments)")


def warn_undivided(reports):
  """One warning line per undivided dimension; called once where a run's shardings are made
  (not per step), so a run says it once."""
  for r in reports:
    log.warning("not sharded as mesh.rules ask: %s", describe_undivided(r))


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activate(mesh, rules=DEFAULT_RULES):
  """The mesh and logical rules that tracing a model under jit needs."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield

"""Logical axis names -> mesh axes, and the shardings that follow for params and batches.

Models annotate with logical names only. Rules are tried in order and a mesh axis is used at
most once per array, so activations ('batch', 'length', 'embed') shard the batch over
('data', 'fsdp') while parameters ('embed', 'mlp') shard over 'fsdp' and 'tensor'.
"""
import contextlib

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxret.parallel.mesh import BATCH_AXES

RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("joint", None),
    ("layers", None),  # the stacked axis of scanned encoder blocks
)


def logical_shardings(abstract_boxed, mesh, rules=RULES):
  """NamedShardings for a tree of flax LogicallyPartitioned leaves (e.g. eval_shape(init)).

  A dimension that does not divide evenly over its mesh axes (a 45-word vocabulary over
  tensor=2) is replicated instead: XLA cannot place uneven shards of a parameter.
  """
  is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731

  def one(leaf):
    if not is_boxed(leaf):
      return NamedSharding(mesh, P())
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    return NamedSharding(mesh, fit_spec(spec, leaf.value.shape, mesh))

  return jax.tree.map(one, abstract_boxed, is_leaf=is_boxed)


def fit_spec(spec, shape, mesh):
  """`spec` with every mesh axis dropped from dimensions it does not divide."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for a in names:
      size *= mesh.shape[a]
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())



@contextlib.contextmanager
def activate(mesh, rules=RULES):
  """The mesh and logical rules that tracing a model under jit needs."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield

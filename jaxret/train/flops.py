"""Matmul FLOPs of a function, counted from its jaxpr.

XLA's cost analysis counts a while-loop body once, so a scanned encoder (model.scan) is
reported low by about its layer count. The jaxpr keeps the loop structure: a `scan` equation
carries its `length`, so each dot inside it is multiplied by the trip count of every scan
around it. Traced from abstract arguments (ShapeDtypeStructs): nothing is allocated or compiled.

Counted: dot_general (2 * output elements * contracted size) and conv_general_dilated (the
patch embedding), in the forward and backward pass alike (the jaxpr of a gradient contains
both, and any rematerialised forward recomputation). Left out: elementwise work, softmax,
normalisation, reductions, gathers and the optimizer update; for transformers these are a
few percent of the matmuls. A `while` loop of unknown trip count is counted once.
"""
import math

import jax

__all__ = ["matmul_flops", "jaxpr_matmul_flops"]


def matmul_flops(fn, *args, **kwargs):
  """FLOPs of the matmuls and convolutions `fn(*args, **kwargs)` runs (args may be abstract)."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def _subjaxprs(value):
  """Jaxprs held by an equation parameter (a Jaxpr, a ClosedJaxpr, or a tuple of them)."""
  if hasattr(value, "eqns"):
    return [value]
  if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    return [value.jaxpr]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _subjaxprs(v)]
  return []


def _eqn_flops(eqn):
  name = eqn.primitive.name
  if name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    # Each output element sums over the kernel's input features and window.
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_feature_dim]
  inner = [j for v in eqn.params.values() for j in _subjaxprs(v)]
  if not inner:
    return 0
  if name == "cond":  # one branch runs: the dearest
    return max(jaxpr_matmul_flops(j) for j in inner)
  total = sum(jaxpr_matmul_flops(j) for j in inner)
  if name == "scan":
    total *= eqn.params["length"]
  elif name == "shard_map":  # the body sees one device's block; every device runs it
    total *= eqn.params["mesh"].size
  return total


def jaxpr_matmul_flops(jaxpr):
  return sum(_eqn_flops(e) for e in jaxpr.eqns)

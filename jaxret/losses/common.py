"""Plumbing shared by the sharded loss kernels: axis checks, gathers, row losses.

Every kernel has the DisCo-CLIP / open_clip `--local-loss --gather-with-grad` form:
inside `jax.shard_map` each device scores only its own b rows against the
all-gathered other side (b x B, never B x B), the positive of local row i sits at
global column `axis_index * b + i`, and the summed row losses are psum-ed over the
batch axes.
"""

import math

import jax
import jax.numpy as jnp

from jaxret.errors import UserError, did_you_mean

DEFAULT_AXES = ("data", "fsdp")


def batch_axes(mesh, axes):
  """`axes` as a tuple of mesh axis names, checked against the mesh."""
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  if not axes:
    raise UserError("loss batch axes are empty; name the mesh axes the batch is split over, e.g. ('data', 'fsdp')")
  for name in axes:
    if name not in mesh.axis_names:
      raise UserError(f"loss batch axis '{name}' is not a mesh axis{did_you_mean(name, mesh.axis_names)}; "
                      f"mesh axes: {', '.join(mesh.axis_names)}")
  return axes


def global_batch(mesh, axes, **arrays):
  """The shared global batch size of `arrays`, checked to split evenly over `axes`."""
  sizes = {name: jnp.shape(a)[0] for name, a in arrays.items()}
  batch = next(iter(sizes.values()))
  if any(s != batch for s in sizes.values()):
    raw = ", ".join(f"{k}={v}" for k, v in sizes.items())
    raise UserError(f"loss inputs disagree on the batch size ({raw}); image and text batches must pair up")
  devices = math.prod(mesh.shape[a] for a in axes)
  if batch % devices:
    raise UserError(f"global batch {batch} does not split over the {devices} devices of mesh axes "
                    f"{axes}; make the batch size a multiple of {devices}")
  return batch


def gather(x, axes):
  """All rows of `x` from every device on `axes`, in global batch order (gradients flow back)."""
  return jax.lax.all_gather(x, axes, tiled=True)


def positive_columns(local_batch, axes):
  """Global column of each local row's positive: this shard's offset plus the row index."""
  return jax.lax.axis_index(axes) * local_batch + jnp.arange(local_batch)


def dot(a, b):
  """a [m,d] x b [n,d] -> [m,n], accumulated in fp32 so half-precision features stay exact enough."""
  return jnp.einsum("md,nd->mn", a, b, preferred_element_type=jnp.float32)


def cross_entropy_sum(logits, labels):
  """Sum over rows of softmax cross-entropy of `logits` [b,B] with integer `labels` [b]."""
  positive = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  return jnp.sum(jax.nn.logsumexp(logits, axis=1) - positive)


def as_scalar(x):
  return jnp.asarray(x, jnp.float32)


def ring_size(mesh, axes):
  """Devices on the batch axes: the length of the ring (and of the all-gather)."""
  return math.prod(mesh.shape[a] for a in axes)


def shift(tree, axes, size, step=1):
  """Every array of `tree` moves `step` (+1 or -1) places round the ring of `size` devices.

  ppermute over a tuple of axes numbers devices the same way as `axis_index(axes)` and the
  batch order of P(axes), so after k shifts by +1 a device holds the rows of device index - k.
  Arrays of one item size travel as one buffer: each collective is a sync of every device,
  and on small blocks that fixed cost, not the bytes, is what a ring step costs.
  """
  perm = [(i, (i + step) % size) for i in range(size)]
  leaves, treedef = jax.tree.flatten(tree)
  out = list(leaves)
  for width in sorted({x.dtype.itemsize for x in leaves}):
    group = [i for i, x in enumerate(leaves) if x.dtype.itemsize == width]
    words = [_as_uint(leaves[i]).reshape(-1) for i in group]
    buffer = jax.lax.ppermute(words[0] if len(group) == 1 else jnp.concatenate(words), axes, perm)
    start = 0
    for i in group:
      x = leaves[i]
      out[i] = _from_uint(buffer[start:start + x.size].reshape(x.shape), x.dtype)
      start += x.size
  return jax.tree.unflatten(treedef, out)


def _as_uint(x):
  """Same-width bit view (a no-op for XLA, unlike a view as bytes)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint8)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


def _from_uint(x, dtype):
  return x.astype(dtype) if dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, dtype)


def varying(x, axes):
  """`x` (replicated) as a per-device value; autodiff sums its per-device cotangents (psum)."""
  return jax.lax.pcast(x, axes, to="varying")

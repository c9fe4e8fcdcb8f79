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


def shift(tree, axes, size):
  """Every array of `tree` moves one step round the ring of `size` devices on `axes`.

  ppermute over a tuple of axes numbers devices the same way as `axis_index(axes)` and the
  batch order of P(axes), so after k shifts a device holds the rows of device index - k.
  """
  perm = [(i, (i + 1) % size) for i in range(size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), tree)


def varying(x, axes):
  """`x` (replicated) as a per-device value; autodiff sums its per-device cotangents (psum)."""
  return jax.lax.pcast(x, axes, to="varying")

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


def flat(negatives):
  """Hard negatives [b, k, ...] -> [b * k, ...]: example-major, as the columns are laid out."""
  return negatives.reshape(-1, *negatives.shape[2:])


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


# Blocks up to this size travel packed into one buffer and, on even rings, by pair swaps:
# a small block's move costs its collectives' syncs. Larger blocks travel as they are, by
# ppermute: their compute hides the syncs, and packing and swapping would hold about three
# copies of the message instead of one.
SMALL_BLOCK_BYTES = 256 * 2**10


# How a ring move travels, per backend (`loss.ring_moves=auto`). "swaps": pairwise exchanges
# (a two-device all_gather each); "ppermute": one collective over all D devices. Measured on
# CPU (BENCHMARKS.md, "Ring moves"): on simulated devices a ppermute makes every device wait
# for the slowest, and swaps of 32-256 KiB blocks ran 1.1-1.7x faster. GPU and TPU: not
# measured yet (one GPU at most was lent, and a ring needs two or more), so they keep
# ppermute, the collective every backend implements, until `benchmarks/losses.py
# --moves-only` is run there.
RING_MOVES = {"cpu": "swaps", "gpu": "ppermute", "tpu": "ppermute"}
MOVES = ("auto", "ppermute", "swaps")


def ring_moves(moves="auto", backend=None):
  """The move kind for `moves` ("auto": this backend's entry of RING_MOVES)."""
  if moves != "auto":
    return moves
  return RING_MOVES.get(backend or jax.default_backend(), "ppermute")


class Ring:
  """How one walk round the ring moves its blocks: chosen once from the travelling block
  (`block`: its shape and dtype) and `moves` (auto | ppermute | swaps), so that every move of
  a walk, and any walk undoing it (ring.lse_sum's backward), moves the same way. Swaps apply
  to small blocks on even rings; the rest travel by ppermute whatever `moves` says."""

  def __init__(self, axes, size, block, moves="auto"):
    self.axes, self.size = axes, size
    small = block.size * block.dtype.itemsize <= SMALL_BLOCK_BYTES
    self.packed = small
    self.swaps = small and size % 2 == 0 and ring_moves(moves) == "swaps"

  def walk(self, step, carry, count, first=0):
    """carry = step(carry, parity) for moves first, first + 1, ... (count of them), as one
    scan; `parity` (move number % 2) is traced. (Unrolling, or a scan over pairs of moves
    with static parities, gives each copy of the step its own buffers: about twice the
    temp memory, for no speed.)"""
    carry, _ = jax.lax.scan(lambda c, k: (step(c, k % 2), None), carry,
                            jnp.arange(first, first + count))
    return carry

  def move(self, tree, parity, inverse=False):
    """Move number k (parity = k % 2) of a walk that takes every device's block to every
    other device in D-1 moves, and home again on move D-1 (the D-th). `inverse` undoes it.

    Swaps: between devices (2m, 2m+1) on even moves and (2m+1, 2m+2) on odd ones, so
    blocks from even devices walk the ring forwards and those from odd devices backwards.
    A swap is a two-device collective (an all_gather over pairs); a ppermute syncs all D
    devices, which on CPU-simulated devices is most of a small block's step. Otherwise
    ppermute: after k moves a device holds the block of device index - k. Packed: arrays
    of one item size travel as one buffer (one collective, not one each).
    """
    if self.size == 1:
      return tree
    if not self.packed:
      return jax.tree.map(lambda x: self._move(x, parity, inverse), tree)
    leaves, treedef = jax.tree.flatten(tree)
    out = list(leaves)
    for width in sorted({x.dtype.itemsize for x in leaves}):
      group = [i for i, x in enumerate(leaves) if x.dtype.itemsize == width]
      words = [_as_uint(leaves[i]).reshape(-1) for i in group]
      buffer = self._move(words[0] if len(group) == 1 else jnp.concatenate(words), parity,
                          inverse)
      start = 0
      for i in group:
        x = leaves[i]
        out[i] = _from_uint(buffer[start:start + x.size].reshape(x.shape), x.dtype)
        start += x.size
    return jax.tree.unflatten(treedef, out)

  def _move(self, x, parity, inverse):
    if not self.swaps:
      step = -1 if inverse else 1
      return jax.lax.ppermute(x, self.axes, [(i, (i + step) % self.size) for i in range(self.size)])
    if not isinstance(parity, int):  # a traced parity picks the pairing (groups are static)
      return jax.lax.cond(parity == 0, lambda x: self._swap(x, 0), lambda x: self._swap(x, 1), x)
    return self._swap(x, parity)

  def _swap(self, x, parity):
    size = self.size
    groups = [[(2 * m + parity) % size, (2 * m + 1 + parity) % size] for m in range(size // 2)]
    pair = jax.lax.all_gather(x, self.axes, axis_index_groups=groups)  # [2, ...] group order
    first = (jax.lax.axis_index(self.axes) + parity) % 2 == 0  # this device is its pair's first
    return jnp.where(first, pair[1], pair[0])


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

"""`jaxret search`: the exact top-k of a store for a text or image query, optionally reranked
by FILIP late interaction.

The store's rows are split over a data-parallel mesh (one block of rows per device, padded);
each device scores its block against the queries and keeps its own top k (`jax.lax.top_k`),
and the D x k survivors are merged by a second top k. The merge is exact: every global top-k
item is in its own device's top k. Ties go to the lower row on both levels, as numpy's stable
argsort of -scores orders them.

The rows are held in float32 on the devices (widened exactly from the store's float16): on
XLA:CPU a float16 dot runs ~10x slower than a float32 one (BENCHMARKS.md, "Search").
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxret.errors import UserError
from jaxret.inference import contact_sheet
from jaxret.inference.embed import ItemReader
from jaxret.inference.loaders import load
from jaxret.inference.store import Store
from jaxret.losses.filip import filip_scores
from jaxret.parallel.mesh import make_mesh

AXIS = "data"


class Index:
  """Store rows on the devices; `top_k(queries, k)` -> (scores [Q,k], rows [Q,k]) numpy."""

  def __init__(self, emb, mesh=None, dtype=np.float32):
    self.mesh = mesh or make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
    devices = self.mesh.shape[AXIS]
    self.n, self.dim = emb.shape
    self.rows_per_device = -(-self.n // devices)
    total = self.rows_per_device * devices
    sharding = NamedSharding(self.mesh, P(AXIS))
    # Laid out block by block from the host array: the padded copy never exists on the host.
    def block(idx):
      out = np.zeros((len(range(*idx[0].indices(total))), self.dim), dtype)
      lo = idx[0].start or 0
      part = emb[lo:min(self.n, lo + len(out))]
      out[:len(part)] = part
      return out
    self.array = jax.make_array_from_callback((total, self.dim), sharding, block)

  def top_k(self, queries, k):
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if queries.shape[1] != self.dim:
      raise UserError(f"the query embedding has dimension {queries.shape[1]} but the store "
                      f"{self.dim}: search with the model that built the store")
    k = int(min(k, self.n))
    if k < 1:
      raise UserError(f"--k must be at least 1, got {k}")
    q = jax.device_put(queries, NamedSharding(self.mesh, P()))
    scores, rows = _top_k_fn(self.mesh, k, self.n, self.rows_per_device)(q, self.array)
    return np.asarray(scores), np.asarray(rows)


@functools.lru_cache(maxsize=32)
def _top_k_fn(mesh, k, n, m):
  local_k = min(k, m)

  def local(q, rows):
    first = jax.lax.axis_index(AXIS) * m
    s = jnp.einsum("qd,nd->qn", q, rows, preferred_element_type=jnp.float32)
    if n < m * mesh.shape[AXIS]:  # padding rows never win (a pass over the scores: only then)
      s = jnp.where((first + jnp.arange(m) < n)[None, :], s, -jnp.inf)
    v, i = jax.lax.top_k(s, local_k)
    return v[None], (i + first)[None]

  def search(q, rows):
    v, i = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS)),
                         out_specs=(P(AXIS), P(AXIS)))(q, rows)  # [D, Q, local_k]
    v = jnp.moveaxis(v, 0, 1).reshape(q.shape[0], -1)  # device-major: lower rows first
    i = jnp.moveaxis(i, 0, 1).reshape(q.shape[0], -1)
    best_v, pos = jax.lax.top_k(v, k)
    return best_v, jnp.take_along_axis(i, pos, axis=1)

  return jax.jit(search)


# ---------------------------------------------------------------------------- FILIP rerank

@jax.jit
def _late_interaction(q_tokens, q_mask, c_tokens, c_mask, q_is_image):
  """Mean over the query's valid tokens of the max over each candidate's: FILIP's s^I for an
  image query (query in the image slot), s^T for a text query (query in the text slot)."""
  as_image = filip_scores(q_tokens, q_mask, c_tokens, c_mask)[0][0]  # s^I [1, C] -> [C]
  as_text = filip_scores(c_tokens, c_mask, q_tokens, q_mask)[1][:, 0]  # s^T [C, 1] -> [C]
  return jnp.where(q_is_image, as_image, as_text)


def rerank(query_tokens, query_mask, query_is_image, cand_tokens, cand_mask):
  """Late-interaction scores [C] of one query's candidates (float32 from the stored float16)."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return np.asarray(_late_interaction(f32(query_tokens)[None], jnp.asarray(query_mask)[None],
                                      f32(cand_tokens), jnp.asarray(cand_mask),
                                      bool(query_is_image)))


# ---------------------------------------------------------------------------- the command

DEFAULT_CANDIDATES = 100


def describe(item):
  """A store id as printed: an image path, 'line N: caption', or 'record N'."""
  if isinstance(item, dict):
    return f"line {item['line']}: {item['text']}"
  return f"record {item}" if isinstance(item, int) else str(item)


def _store_model(store, model_path=None):
  """`model_path`, or else the model (and checkpoint step) that built the store."""
  return load(model_path or store.meta["model"], None if model_path else store.meta.get("step"))


def search_queries(index, queries, *, image=None, show=None, **options):
  """`jaxret search` with any number of text queries (or one --image): the store and the model
  are loaded once; with several queries each is headed by its text and `show`=PATH.png becomes
  PATH-1.png, PATH-2.png, ... -> one result list per query."""
  queries = list(queries or [])
  if image is not None or len(queries) < 2:
    return [search_store(index, queries[0] if queries else None, image=image, show=show,
                         **options)]
  store = options.pop("store", None) or Store(index)
  model_path = options.pop("model_path", None)
  model = options.pop("model", None) or _store_model(store, model_path)
  out = []
  for n, query in enumerate(queries, 1):
    if not options.get("quiet"):
      print(f"query {n}: {query}", flush=True)
    path = None
    if show:
      stem, ext = os.path.splitext(show)
      path = f"{stem}-{n}{ext or '.png'}"
    out.append(search_store(index, query, show=path, model=model, store=store, **options))
  return out


def search_store(index, query=None, *, image=None, k=10, model_path=None, rerank_=False,
                 candidates=DEFAULT_CANDIDATES, show=None, model=None, store=None, quiet=False):
  """`jaxret search`: -> [{"rank", "score", "row", "id"}] of the k best items (printed as
  `rank score id` unless quiet). `model`, `store` reuse loaded ones."""
  if (query is None) == (image is None):
    raise UserError("pass a text query or --image PATH (one of them)")
  store = store or Store(index)
  model = model or _store_model(store, model_path)
  if model.embed_dim != store.dim:
    raise UserError(f"model '{model.path}' embeds in {model.embed_dim} dimensions but store "
                    f"'{store.path}' holds {store.dim}: use the model that built it "
                    f"({store.meta['model']})")
  if rerank_ and not store.has_tokens:
    raise UserError(f"--rerank needs token embeddings: store '{store.path}' has none; rebuild "
                    "it with `jaxret embed ... --tokens`")
  if show and store.kind != "image":
    raise UserError(f"--show draws images, but store '{store.path}' holds {store.kind} "
                    "embeddings")
  encode = model.encode_images if image is not None else model.encode_texts
  q = encode([image if image is not None else query], tokens=rerank_)
  pooled = q["emb"] if rerank_ else q
  ix = Index(store.emb, model.mesh)
  scores, rows = ix.top_k(pooled, max(k, candidates) if rerank_ else k)
  scores, rows = scores[0], rows[0]
  if rerank_:
    tokens, mask = store.token_rows(rows)
    late = rerank(q["tokens"][0], q["mask"][0], image is not None, tokens, mask)
    order = np.argsort(-late, kind="stable")[:k]  # ties keep the pooled order
    scores, rows = late[order], rows[order]
  results = [{"rank": n, "score": float(s), "row": int(r), "id": store.ids[r]}
             for n, (s, r) in enumerate(zip(scores, rows), 1)]
  if not quiet:
    for res in results:
      print(f"{res['rank']:>4}  {res['score']:.4f}  {describe(res['id'])}", flush=True)
  if show:
    reader = ItemReader(store.meta["source"], model)
    title = query if image is None else model.preprocess(image)
    contact_sheet.draw(show, title, [(reader.raw_image(r["id"]), f"{r['rank']}. {r['score']:.3f}")
                                     for r in results])
    if not quiet:
      print(f"wrote {show}", flush=True)
  return results

"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, and weight
decay only on parameters whose '/'-joined path matches `optim.decay_regex`."""
import re

import jax
import optax


def param_paths(tree):
  """The same tree with each leaf replaced by its '/'-joined path ('image/encoder/.../kernel')."""
  def name(path, _):
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
  return jax.tree_util.tree_map_with_path(name, tree)


def regex_mask(tree, pattern):
  """True where a leaf's path matches `pattern` (the one regex-over-params mechanism)."""
  rx = re.compile(pattern)
  return jax.tree.map(lambda p: bool(rx.fullmatch(p)), param_paths(tree))


def make_schedule(optim_cfg, total_steps):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=total_steps, end_value=optim_cfg.end_lr)


OPTIMIZERS = ("adamw", "lamb")


def make_optimizer(optim_cfg, total_steps):
  """-> (optax transformation, learning-rate schedule).

  adamw: AdamW (decoupled weight decay); `mu_dtype` bfloat16 halves the first moment's memory.
  lamb: LAMB (layer-wise trust ratio), as FILIP trained with.
  """
  schedule = make_schedule(optim_cfg, total_steps)
  decay_mask = lambda params: regex_mask(params, optim_cfg.decay_regex)  # noqa: E731
  parts = []
  if optim_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  if optim_cfg.name == "adamw":
    parts.append(optax.adamw(
        schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay, mask=decay_mask,
        mu_dtype=optim_cfg.mu_dtype or None))
  else:
    parts.append(optax.lamb(
        schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule

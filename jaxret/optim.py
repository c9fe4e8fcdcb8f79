"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, and weight
decay only on parameters whose '/'-joined path matches `optim.decay_regex`."""
import optax

from jaxret.param_rules import regex_mask


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

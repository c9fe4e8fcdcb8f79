"""The optimizer: AdamW or LAMB with linear warmup + cosine decay and global-norm clipping, with
per-parameter behaviour from `optim.rules` (jaxret/config.py PARAM_SETTINGS):

- frozen: the parameter gets a zero update and holds no optimizer state (optax.multi_transform:
  the trainable branch sees frozen leaves masked out, so Adam moments exist only for the rest);
  its gradient does not count towards the clipping norm (the clip runs inside that branch).
- lr_mult: scales the parameter's final update, weight-decay term included (as big_vision's
  per-parameter schedules do). Unlike `frozen`, lr_mult=0 keeps Adam moments and the gradient
  still counts in the clipping norm.
- wd_mult: scales the decoupled weight decay `optim.weight_decay * wd_mult * param`; its default
  is 1 where `optim.decay_regex` matches the path, else 0.

With no rules the transformation, its state's pytree and its updates are exactly
`chain(clip_by_global_norm, optax.adamw(..., mask=decay_regex))` (or optax.lamb): checkpoints of
older runs restore, and tests/test_param_rules.py compares the updates bit for bit.
"""
import re

import jax
import optax

from jaxret.config import PARAM_SETTINGS
from jaxret.param_rules import rule_setting


def make_schedule(optim_cfg, total_steps):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=total_steps, end_value=optim_cfg.end_lr)


OPTIMIZERS = ("adamw", "lamb")


def param_setting(optim_cfg, params, name):
  """Tree of one per-parameter setting (frozen, lr_mult, wd_mult, load) under optim.rules."""
  if name == "wd_mult":
    decay = re.compile(optim_cfg.decay_regex)
    default = lambda path: 1.0 if decay.fullmatch(path) else 0.0  # noqa: E731
  else:
    default = lambda path: PARAM_SETTINGS[name]  # noqa: E731
  return rule_setting(params, optim_cfg.rules, name, default)


def _rules_set(optim_cfg, name, unless):
  """Whether some rule sets `name` to anything but `unless` (decides the chain's shape from the
  config alone, so the optimizer is built before any parameter exists)."""
  return any(name in s and s[name] != unless for _, s in optim_cfg.rules)


def _add_weighted_decay(weights):
  """updates + w * params, with w per leaf from `weights(tree)`: optax.add_decayed_weights with a
  weight per leaf. Same arithmetic (`g + w * p`, w a Python float) and an EmptyState, so wrapped
  in optax.masked it matches adamw's masked decay exactly when w is weight_decay * 1.0."""
  def update(updates, state, params):
    if params is None:
      raise ValueError("weight decay needs the params: tx.update(grads, state, params)")
    out = jax.tree.map(lambda g, p, w: g if w == 0 else g + w * p, updates, params,
                       weights(updates))
    return out, state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _scale_per_leaf(mults):
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u if m == 1 else u * m, updates, mults(updates)), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(optim_cfg, total_steps):
  """-> (optax transformation, learning-rate schedule).

  adamw: AdamW (decoupled weight decay); `mu_dtype` bfloat16 halves the first moment's memory.
  lamb: LAMB (layer-wise trust ratio), as FILIP trained with.
  """
  schedule = make_schedule(optim_cfg, total_steps)
  setting = lambda name: (lambda tree: param_setting(optim_cfg, tree, name))  # noqa: E731
  wd = optim_cfg.weight_decay
  decay = optax.masked(
      _add_weighted_decay(lambda t: jax.tree.map(lambda m: wd * m, setting("wd_mult")(t))),
      lambda t: jax.tree.map(lambda m: m > 0, setting("wd_mult")(t)))
  if optim_cfg.name == "adamw":
    parts = [optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                                 mu_dtype=optim_cfg.mu_dtype or None),
             decay, optax.scale_by_learning_rate(schedule)]
  else:
    parts = [optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps), decay,
             optax.scale_by_trust_ratio(), optax.scale_by_learning_rate(schedule)]
  if _rules_set(optim_cfg, "lr_mult", 1.0):
    parts.append(_scale_per_leaf(setting("lr_mult")))
  # Nested as chain(clip, chain(adam, decay, lr)): the pytree optax.adamw's state had.
  tx = optax.chain(*([optax.clip_by_global_norm(optim_cfg.grad_clip_norm)]
                     if optim_cfg.grad_clip_norm > 0 else []), optax.chain(*parts))
  if _rules_set(optim_cfg, "frozen", False):
    labels = lambda t: jax.tree.map(lambda f: "frozen" if f else "train", setting("frozen")(t))  # noqa: E731
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  if optim_cfg.skip_nonfinite:
    # Skip (never apply) a non-finite update; the loop stops after N in a row itself
    # (train/health.py), so apply_if_finite's own "apply anyway after N" never comes.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
  return tx, schedule

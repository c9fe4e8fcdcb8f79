"""Losses by config name: what each needs from the model and how eval should score."""

import dataclasses
import math
import numbers
from typing import Callable

import jax.numpy as jnp

from jaxret.config import LOSS_OPTIONS as OPTIONS
from jaxret.errors import UserError, did_you_mean
from jaxret.losses.common import DEFAULT_AXES, MOVES
from jaxret.losses.filip import drop_special, filip_loss
from jaxret.losses.sigmoid import sigmoid_loss
from jaxret.losses.softmax import softmax_loss
from jaxret.losses.triplet import triplet_loss


@dataclasses.dataclass(frozen=True)
class Loss:
  """A loss as the trainer and eval see it.

  fn(outputs, *, mesh, axes, options=None) reads the model outputs dict ('image_emb',
  'text_emb', 'image_tokens', 'image_mask', 'text_tokens', 'text_mask', 'image_special',
  'text_special', 'scale', 'bias'; `scale` is the multiplier, already exp-ed and clamped
  by the model) and returns the replicated scalar loss. `options` is the config's `loss`
  section (a mapping of OPTIONS keys; missing keys and None take the OPTIONS defaults);
  the trainer passes the Loss's own `options`, bound by `get_loss(name, cfg.loss)`.
  """
  name: str
  needs_tokens: bool  # needs per-token embeddings and masks, not just pooled ones
  uses_bias: bool  # reads the learnt logit bias
  similarity: str  # "pooled" | "late_interaction": what retrieval eval should score with
  fn: Callable
  options: dict = dataclasses.field(default_factory=lambda: dict(OPTIONS))


IMPLS = ("all_gather", "ring")
COMM_DTYPES = ("float32", "bfloat16", "float16")


def check_options(options):
  """The loss options with defaults filled in; one-line UserErrors for bad values."""
  options = dict(options or {})
  options.pop("name", None)
  options.pop("distill", None)  # a term the train step adds (train/objective.py), not a kernel's
  for key in options:
    if key not in OPTIONS:
      raise UserError(f"unknown loss option 'loss.{key}'{did_you_mean(key, OPTIONS)}; valid: "
                      f"{', '.join(OPTIONS)}")
  out = {**OPTIONS, **options}
  if out["impl"] not in IMPLS:
    raise UserError(f"unknown loss.impl {out['impl']!r}{did_you_mean(out['impl'], IMPLS)}; valid: "
                    f"{', '.join(IMPLS)}")
  if out["ring_moves"] not in MOVES:
    raise UserError(f"unknown loss.ring_moves {out['ring_moves']!r}"
                    f"{did_you_mean(out['ring_moves'], MOVES)}; valid: {', '.join(MOVES)}")
  fraction = out["filip_token_fraction"]
  if (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)
      or not 0 < fraction <= 1):
    raise UserError(f"loss.filip_token_fraction must be in (0, 1] (1.0 keeps every token), got "
                    f"{fraction!r}")
  dtype = out["filip_comm_dtype"]
  if dtype not in COMM_DTYPES:
    raise UserError(f"unknown loss.filip_comm_dtype {dtype!r}{did_you_mean(dtype, COMM_DTYPES)}; "
                    f"valid: {', '.join(COMM_DTYPES)}")
  if not isinstance(out["filip_special_tokens"], bool):
    raise UserError(f"loss.filip_special_tokens must be true or false, got "
                    f"{out['filip_special_tokens']!r}")
  chunk = out["filip_chunk"]
  if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 0:
    raise UserError(f"loss.filip_chunk must be a whole number >= 0 (0: no split), got {chunk!r}")
  margin = out["triplet_margin"]
  if (isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(margin)
      or margin <= 0):  # at margin <= 0, equal embeddings for everything cost 0: a trivial minimum
    raise UserError(f"loss.triplet_margin must be > 0 (VSE++ uses 0.2), got {margin!r}")
  if not isinstance(out["triplet_max_violation"], bool):
    raise UserError(f"loss.triplet_max_violation must be true or false, got "
                    f"{out['triplet_max_violation']!r}")
  return out


def _take(outputs, loss, keys):
  missing = [k for k in keys if k not in outputs]
  if missing:
    raise UserError(f"loss '{loss}' needs model outputs {', '.join(missing)}, which the model did not "
                    f"return (it gave: {', '.join(sorted(outputs))}); pick a model that emits them or another loss")
  return [outputs[k] for k in keys]


def _softmax(outputs, *, mesh, axes=DEFAULT_AXES, options=None):
  o = check_options(options)
  return softmax_loss(*_take(outputs, "softmax", ("image_emb", "text_emb", "scale")), mesh=mesh,
                      axes=axes, impl=o["impl"], moves=o["ring_moves"],
                      negatives=outputs.get("neg_text_emb"))


def _sigmoid(outputs, *, mesh, axes=DEFAULT_AXES, options=None):
  o = check_options(options)
  keys = ("image_emb", "text_emb", "scale", "bias")
  return sigmoid_loss(*_take(outputs, "sigmoid", keys), mesh=mesh, axes=axes, impl=o["impl"],
                      moves=o["ring_moves"], negatives=outputs.get("neg_text_emb"))


def _filip(outputs, *, mesh, axes=DEFAULT_AXES, options=None):
  o = check_options(options)
  keys = ("image_tokens", "image_mask", "text_tokens", "text_mask", "scale")
  image_tokens, image_mask, text_tokens, text_mask, scale = _take(outputs, "filip", keys)
  negatives = None
  if "neg_text_tokens" in outputs:  # hard negatives: [B, k, Nt, d] tokens, [B, k, Nt] masks
    negatives = (outputs["neg_text_tokens"], outputs["neg_text_mask"])
  if not o["filip_special_tokens"]:
    image_special, text_special = _take(outputs, "filip", ("image_special", "text_special"))
    image_mask, text_mask = drop_special(image_mask, image_special), drop_special(text_mask, text_special)
    if negatives is not None:
      tokens, mask = negatives
      flat = drop_special(mask.reshape(-1, mask.shape[-1]),
                          outputs["neg_text_special"].reshape(-1, mask.shape[-1]))
      negatives = (tokens, flat.reshape(mask.shape))
  return filip_loss(image_tokens, image_mask, text_tokens, text_mask, scale, mesh=mesh, axes=axes,
                    impl=o["impl"], token_fraction=o["filip_token_fraction"],
                    comm_dtype=jnp.dtype(o["filip_comm_dtype"]), chunk=o["filip_chunk"],
                    moves=o["ring_moves"], negatives=negatives)


def _triplet(outputs, *, mesh, axes=DEFAULT_AXES, options=None):
  o = check_options(options)
  image_emb, text_emb = _take(outputs, "triplet", ("image_emb", "text_emb"))  # no scale: cosines
  return triplet_loss(image_emb, text_emb, mesh=mesh, axes=axes, margin=o["triplet_margin"],
                      max_violation=o["triplet_max_violation"], impl=o["impl"],
                      moves=o["ring_moves"])


_LOSSES = {
    loss.name: loss for loss in (
        Loss("softmax", needs_tokens=False, uses_bias=False, similarity="pooled", fn=_softmax),
        Loss("sigmoid", needs_tokens=False, uses_bias=True, similarity="pooled", fn=_sigmoid),
        Loss("filip", needs_tokens=True, uses_bias=False, similarity="late_interaction", fn=_filip),
        Loss("triplet", needs_tokens=False, uses_bias=False, similarity="pooled", fn=_triplet),
    )
}
LOSS_NAMES = tuple(sorted(_LOSSES))


def get_loss(name, options=None):
  """The `Loss` registered as `name` (exact match; a UserError names the nearest one), with
  `options` (the config's `loss` section) checked and bound as its `options`."""
  if not isinstance(name, str) or name not in _LOSSES:
    raise UserError(f"unknown loss {name!r}{did_you_mean(name, LOSS_NAMES)}; valid: {', '.join(LOSS_NAMES)}")
  return dataclasses.replace(_LOSSES[name], options=check_options(options))

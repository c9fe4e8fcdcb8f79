"""Losses by config name: what each needs from the model and how eval should score."""

import dataclasses
from typing import Callable

from jaxret.errors import UserError, did_you_mean
from jaxret.losses.common import DEFAULT_AXES
from jaxret.losses.filip import filip_loss
from jaxret.losses.sigmoid import sigmoid_loss
from jaxret.losses.softmax import softmax_loss


@dataclasses.dataclass(frozen=True)
class Loss:
  """A loss as the trainer and eval see it.

  fn(outputs, *, mesh, axes) reads the model outputs dict ('image_emb', 'text_emb',
  'image_tokens', 'image_mask', 'text_tokens', 'text_mask', 'scale', 'bias'; `scale`
  is the multiplier, already exp-ed and clamped by the model) and returns the
  replicated scalar loss.
  """
  name: str
  needs_tokens: bool  # needs per-token embeddings and masks, not just pooled ones
  uses_bias: bool  # reads the learnt logit bias
  similarity: str  # "pooled" | "late_interaction": what retrieval eval should score with
  fn: Callable


def _take(outputs, loss, keys):
  missing = [k for k in keys if k not in outputs]
  if missing:
    raise UserError(f"loss '{loss}' needs model outputs {', '.join(missing)}, which the model did not "
                    f"return (it gave: {', '.join(sorted(outputs))}); pick a model that emits them or another loss")
  return [outputs[k] for k in keys]


def _softmax(outputs, *, mesh, axes=DEFAULT_AXES):
  return softmax_loss(*_take(outputs, "softmax", ("image_emb", "text_emb", "scale")), mesh=mesh, axes=axes)


def _sigmoid(outputs, *, mesh, axes=DEFAULT_AXES):
  keys = ("image_emb", "text_emb", "scale", "bias")
  return sigmoid_loss(*_take(outputs, "sigmoid", keys), mesh=mesh, axes=axes)


def _filip(outputs, *, mesh, axes=DEFAULT_AXES):
  keys = ("image_tokens", "image_mask", "text_tokens", "text_mask", "scale")
  return filip_loss(*_take(outputs, "filip", keys), mesh=mesh, axes=axes)


_LOSSES = {
    loss.name: loss for loss in (
        Loss("softmax", needs_tokens=False, uses_bias=False, similarity="pooled", fn=_softmax),
        Loss("sigmoid", needs_tokens=False, uses_bias=True, similarity="pooled", fn=_sigmoid),
        Loss("filip", needs_tokens=True, uses_bias=False, similarity="late_interaction", fn=_filip),
    )
}
LOSS_NAMES = tuple(sorted(_LOSSES))


def get_loss(name):
  """The `Loss` registered as `name` (exact match); a UserError names the nearest one."""
  if not isinstance(name, str) or name not in _LOSSES:
    raise UserError(f"unknown loss {name!r}{did_you_mean(name, LOSS_NAMES)}; valid: {', '.join(LOSS_NAMES)}")
  return _LOSSES[name]

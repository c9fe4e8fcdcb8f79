"""What a train step minimises: the configured loss on the model's outputs, plus
`loss.distill`'s weighted term against the teacher's embeddings when distilling."""

from jaxret.losses.distill import distill_loss


def distill_options(cfg):
  """The config's loss.distill as `objective` takes it, or None when not distilling."""
  d = cfg.loss.distill
  if not d.teacher:
    return None
  return dict(weight=float(d.weight), temperature=float(d.temperature),
              hard_weighting=bool(d.hard_weighting))


def objective(loss, out, *, mesh, axes, distill=None, teacher_emb=None):
  """-> (value, outputs with "distill" added when distilling). `distill`: the config's
  loss.distill section (weight, temperature, hard_weighting); `teacher_emb`: the teacher's
  (image_emb, text_emb) for the same global batch."""
  value = loss.fn(out, mesh=mesh, axes=axes, options=loss.options)
  if distill is None:
    return value, out
  term = distill_loss(out["image_emb"], out["text_emb"], *teacher_emb, mesh=mesh, axes=axes,
                      temperature=distill["temperature"],
                      hard_weighting=distill["hard_weighting"])
  return value + distill["weight"] * term, {**out, "distill": term}

"""Similarity distillation from a teacher (MobileCLIP's reinforced training, Vasu 2024; dynamic
hard-sample weighting after dynamic contrastive distillation, Rao 2023).

The student's image->text and text->image similarity distributions over the global batch are
matched to the teacher's: with p = softmax(cos / tau) row-wise (tau: loss.distill.temperature,
the same for both models),

  KL_i2t(i) = KL(p_teacher(i, .) || p_student(i, .))      over the B texts of the batch
  KL_t2i(j) = KL(p_teacher(., j) || p_student(., j))      over the B images
  loss = (sum_i w_i KL_i2t(i) + sum_j v_j KL_t2i(j)) / (2 B)

Weights are 1, or with `hard_weighting` the teacher's own difficulty of each example,
w_i = B (1 - p_teacher(i, i)) / sum_k (1 - p_teacher(k, k)) (and v likewise by columns): samples
the teacher finds hard weigh more, and the weights average 1. Teacher embeddings carry no
gradient.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxret.losses import common


def _log_probs(logits, axis):
  return jax.nn.log_softmax(logits, axis=axis)


def _kl(teacher_logits, student_logits, axis):
  """KL(softmax(teacher) || softmax(student)) along `axis`."""
  t = _log_probs(teacher_logits, axis)
  return jnp.sum(jnp.exp(t) * (t - _log_probs(student_logits, axis)), axis=axis)


def _weights(hardness, total, batch, hard_weighting):
  """Per-example weights from the teacher's hardness (1 - p(positive)); `total` its sum over
  the global batch."""
  if not hard_weighting:
    return jnp.ones_like(hardness)
  return batch * hardness / jnp.maximum(total, 1e-12)


def distill_reference(student_image, student_text, teacher_image, teacher_text, temperature,
                      hard_weighting=False):
  """The full-batch formula of the module docstring: [B, d] L2-normalised embeddings."""
  teacher_image, teacher_text = jax.lax.stop_gradient((teacher_image, teacher_text))
  s = student_image @ student_text.T / temperature
  t = teacher_image @ teacher_text.T / temperature
  batch = s.shape[0]
  i2t, t2i = _kl(t, s, axis=1), _kl(t, s, axis=0)
  hard_rows = 1 - jnp.exp(jnp.diagonal(_log_probs(t, 1)))
  hard_cols = 1 - jnp.exp(jnp.diagonal(_log_probs(t, 0)))
  w = _weights(hard_rows, jnp.sum(hard_rows), batch, hard_weighting)
  v = _weights(hard_cols, jnp.sum(hard_cols), batch, hard_weighting)
  return (jnp.sum(w * i2t) + jnp.sum(v * t2i)) / (2 * batch)


def distill_loss(student_image, student_text, teacher_image, teacher_text, *, mesh,
                 temperature, hard_weighting=False, axes=common.DEFAULT_AXES):
  """`distill_reference` on arrays whose batch is split over mesh `axes`: each device scores
  its own b rows against the gathered other side (b x B, both models), as the contrastive
  kernels' all_gather form; the weights' normaliser is one psum."""
  axes = common.batch_axes(mesh, axes)
  batch = common.global_batch(mesh, axes, student_image=student_image, student_text=student_text,
                              teacher_image=teacher_image, teacher_text=teacher_text)
  teacher_image, teacher_text = jax.lax.stop_gradient((teacher_image, teacher_text))

  def local(si, st, ti, tt):
    labels = common.positive_columns(si.shape[0], axes)
    rows = []
    for a_s, b_s, a_t, b_t in ((si, st, ti, tt), (st, si, tt, ti)):  # image rows, text rows
      s = common.dot(a_s, common.gather(b_s, axes)) / temperature  # [b, B]
      t = common.dot(a_t, common.gather(b_t, axes)) / temperature
      kl = _kl(t, s, axis=1)
      hardness = 1 - jnp.exp(jnp.take_along_axis(_log_probs(t, 1), labels[:, None], 1)[:, 0])
      rows.append((kl, hardness))
    total = 0.0
    for kl, hardness in rows:
      w = _weights(hardness, jax.lax.psum(jnp.sum(hardness), axes), batch, hard_weighting)
      total += jnp.sum(w * kl)
    return jax.lax.psum(total, axes) / (2 * batch)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axes),) * 4, out_specs=P())
  return sharded(student_image, student_text, teacher_image, teacher_text)

"""Offline distillation data (MobileCLIP's reinforced data set), the record side: what
`jaxret data teacher` (jaxret/inference/teacher_data.py) stores and how training reads it. It copies a
converted data dir and adds, to each record of one split, the teacher's embeddings of several
augmented views of its image (with each view's crop box and flip, so training can make the same
view again) and of each caption:

  record["teacher"] = {"views": [[left, top, right, bottom, flip], ...],
                       "image_emb": float32 bytes [views, d], "text_emb": float32 bytes
                       [captions, d], "dim": d}

A view is the training crop (augment.crop_box + resize_box at the student's image size, the
manifest's image_size unless --image-size), and the teacher embeds it exactly as the online
step does (inference/teacher.teacher_embeddings, resized on the device to the teacher's size), so
online and offline distillation see the same numbers for the same views. The manifest gains
"teacher": {path, split, views, image_size, dim, crop_scale, crop_ratio, flip}; the other splits
are copied unchanged. Training with loss.distill.source="offline" draws one stored view per
record per visit and reads the embeddings instead of running the teacher.
"""

import numpy as np

from jaxret.data import augment, sources
from jaxret.errors import UserError


def apply_view(image, view, size):
  """The stored view [left, top, right, bottom, flip] of a decoded image, size x size uint8."""
  left, top, right, bottom, flip = (int(v) for v in view)
  out = augment.resize_box(image, (left, top, right, bottom), size)
  return np.ascontiguousarray(out[:, ::-1] if flip else out)


def sample_views(image_shape, count, rng, scale, ratio, flip):
  """`count` random crop boxes (torchvision's sampling) with their flips."""
  out = []
  for _ in range(count):
    box = augment.crop_box(rng, image_shape[0], image_shape[1], scale, ratio)
    out.append([*box, int(bool(flip) and rng.random() < 0.5)])
  return out


def stored(record):
  """(views [V, 5] int, image_emb [V, d] float32, text_emb [C, d] float32) of a record."""
  t = record.get("teacher")
  if not isinstance(t, dict):
    raise UserError("a record has no teacher embeddings: make the data with `jaxret data "
                    "teacher`, or set loss.distill.source=online")
  dim = int(t["dim"])
  image = np.frombuffer(t["image_emb"], np.float32).reshape(-1, dim)
  text = np.frombuffer(t["text_emb"], np.float32).reshape(-1, dim)
  return np.asarray(t["views"], np.int64), image, text


def check_teacher_records(data_dir, split, teacher, image_size):
  """Refuses offline distillation on data without stored teacher embeddings for `split`, or
  made for another student image size (the stored views would not be the crops it trains on)."""
  manifest = sources.load_manifest(data_dir)
  info = manifest.get("teacher")
  if not info or info.get("split") != split:
    raise UserError(f"loss.distill.source=offline: '{data_dir}' has no teacher embeddings for "
                    f"split '{split}': make them with `jaxret data teacher --teacher {teacher} "
                    f"--data DIR --out {data_dir}`, or set loss.distill.source=online")
  if int(info["image_size"]) != int(image_size):
    raise UserError(f"loss.distill.source=offline: the teacher's views in '{data_dir}' were made "
                    f"at {info['image_size']} px, the model trains at {image_size}: remake them "
                    f"with `jaxret data teacher --image-size {image_size}`")

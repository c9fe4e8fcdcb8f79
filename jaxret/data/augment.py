"""Image geometry on uint8 [H,W,3] arrays: training random-resized-crop and flip, evaluation
resize + center crop. Pixels stay uint8 (a quarter of float32 through worker processes);
the image tower normalises them on the device (models/vit.py).

The crop is Inception's / torchvision's RandomResizedCrop: a box of random area fraction
`scale` and aspect ratio `ratio` (log-uniform), ten tries, else the largest center crop
within `ratio`. open_clip trains with scale (0.9, 1.0); big_vision's inception_crop uses
(0.05, 1.0) for classification.
"""
import math

import numpy as np
from PIL import Image


def crop_box(rng, height, width, scale, ratio):
  """-> (left, top, right, bottom) of a random crop, torchvision's sampling."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  # Fallback: the whole image, trimmed to the nearest allowed aspect ratio.
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def resize_box(image, box, size):
  """The `box` of `image` resized (bicubic, antialiased) to size x size."""
  if box == (0, 0, image.shape[1], image.shape[0]) and image.shape[:2] == (size, size):
    return image
  im = Image.fromarray(image).resize((size, size), Image.BICUBIC, box=box)
  return np.asarray(im)


def random_resized_crop(image, rng, size, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), flip=False):
  """Training view: a random crop resized to size x size, mirrored half the time if `flip`."""
  out = resize_box(image, crop_box(rng, *image.shape[:2], scale, ratio), size)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def resize_center_crop(image, size):
  """Evaluation view, as CLIP's image processor makes it: the shorter side resized to `size`
  (bicubic), then the centered size x size square."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  if h <= w:
    new_h, new_w = size, int(size * w / h)
  else:
    new_h, new_w = int(size * h / w), size
  im = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.ascontiguousarray(im[top:top + size, left:left + size])

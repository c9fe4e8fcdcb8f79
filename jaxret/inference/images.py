"""Images in, the model's uint8 input out: PIL images, uint8 arrays or file paths of any size,
through the evaluation view (shorter side resized to the model size, bicubic; center crop) that
the evaluator applies, so an image embeds the same here as in `jaxret eval`."""
import os

import numpy as np
from PIL import Image

from jaxret.data.augment import resize_center_crop
from jaxret.data.transforms import to_rgb
from jaxret.errors import UserError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def open_image(path):
  """A file -> uint8 [H,W,3] RGB; a one-line UserError naming the file if it is not an image."""
  try:
    with Image.open(path) as im:
      im.load()
      return np.asarray(to_rgb(im))
  except FileNotFoundError:
    raise UserError(f"image '{path}' not found") from None
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError...
    raise UserError(f"'{path}' is not a readable image ({type(e).__name__}: {e})") from None


def to_array(image):
  """One image (PIL, uint8 array [H,W,3] or [H,W], or a path) -> uint8 [H,W,3] RGB."""
  if isinstance(image, (str, os.PathLike)):
    return open_image(image)
  if isinstance(image, Image.Image):
    return np.asarray(to_rgb(image))
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise UserError(f"image arrays must be uint8 (0-255), got {a.dtype}")
  if a.ndim == 2:
    a = np.repeat(a[:, :, None], 3, axis=2)
  if a.ndim != 3 or a.shape[2] != 3:
    raise UserError(f"an image array must be [H, W, 3] (or [H, W]), got shape {a.shape}")
  return a


def preprocess(image, size):
  """One image -> the uint8 [size, size, 3] evaluation view the model takes."""
  return resize_center_crop(to_array(image), size)


def as_list(images):
  """encode_images' argument -> a sequence of single images (a [n,H,W,3] array is n images)."""
  if isinstance(images, (str, os.PathLike, Image.Image)):
    return [images]
  if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] == 3 and (
      images.dtype == np.uint8):
    return [images]
  return images


def list_folder(folder):
  """Image files under `folder` (recursive), as sorted '/'-joined relative paths."""
  if not os.path.isdir(folder):
    raise UserError(f"--images '{folder}' is not a folder")
  out = []
  for dirpath, dirnames, files in os.walk(folder):
    dirnames.sort()
    for f in files:
      if f.lower().endswith(EXTENSIONS) and not f.startswith("."):
        out.append(os.path.relpath(os.path.join(dirpath, f), folder).replace(os.sep, "/"))
  if not out:
    raise UserError(f"--images '{folder}' holds no images ({', '.join(EXTENSIONS)})")
  return sorted(out)

"""`jaxret search --show out.png`: the query (its text rendered in a tile, or its image) and
its top-k images in one row of equal tiles, each result labelled with its rank and score."""
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 160   # pixels per tile side
LABEL = 28   # the label band under each tile


def sheet_size(k):
  """(width, height) of the sheet for k results."""
  return ((k + 1) * TILE, TILE + LABEL)


def _font(size):
  try:
    return ImageFont.load_default(size)
  except TypeError:  # Pillow < 10.1: one bitmap size
    return ImageFont.load_default()


def _tile(image):
  """uint8 [H,W,3] -> a TILE x TILE PIL image, aspect kept, centered on grey."""
  im = Image.fromarray(np.asarray(image))
  if max(im.size) > TILE:
    im.thumbnail((TILE, TILE), Image.BICUBIC)
  elif max(im.size) < TILE:  # small images (the demo's 64 px): enlarge, without blur
    f = TILE // max(im.size)
    im = im.resize((im.width * f, im.height * f), Image.NEAREST)
  out = Image.new("RGB", (TILE, TILE), (128, 128, 128))
  out.paste(im, ((TILE - im.width) // 2, (TILE - im.height) // 2))
  return out


def _text_tile(text):
  out = Image.new("RGB", (TILE, TILE), (255, 255, 255))
  draw = ImageDraw.Draw(out)
  lines = textwrap.wrap(text, width=18)[:8]
  draw.multiline_text((8, 8), "\n".join(lines), fill=(0, 0, 0), font=_font(16), spacing=4)
  return out


def draw(path, query, results):
  """query: a string or a uint8 image; results: [(image uint8 [H,W,3], label str)]."""
  w, h = sheet_size(len(results))
  sheet = Image.new("RGB", (w, h), (255, 255, 255))
  draw_ = ImageDraw.Draw(sheet)
  sheet.paste(_text_tile(query) if isinstance(query, str) else _tile(query), (0, 0))
  draw_.text((6, TILE + 6), "query", fill=(0, 0, 160), font=_font(14))
  for n, (image, label) in enumerate(results, 1):
    sheet.paste(_tile(image), (n * TILE, 0))
    draw_.text((n * TILE + 6, TILE + 6), label, fill=(0, 0, 0), font=_font(14))
  sheet.save(path)
  return path

"""Training crops and flips, the evaluation view, and weighted mixtures of sources."""
import io
import json
import os

import msgpack
import numpy as np
import pytest
from PIL import Image

from jaxret.data import augment, pipeline, sources
from jaxret.errors import UserError
from test_data_bad_records import encode, good_record, write_dir


def coordinate_image(h, w):
  """Red = column, green = row (scaled to 0..255): a crop's corners say where it came from."""
  x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
  y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
  return np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8)


def test_random_resized_crop_takes_boxes_of_the_asked_area_and_aspect():
  h, w, size = 300, 400, 64
  image = coordinate_image(h, w)
  rng = np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(200):
    out = augment.random_resized_crop(image, rng, size, scale=(0.3, 0.6), ratio=(0.5, 2.0))
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    # The box from the coordinate channels at the corners (pixel centers, ~1px error).
    x0, x1 = out[:, 0, 0].mean() * (w - 1) / 255, out[:, -1, 0].mean() * (w - 1) / 255
    y0, y1 = out[0, :, 1].mean() * (h - 1) / 255, out[-1, :, 1].mean() * (h - 1) / 255
    bw, bh = (x1 - x0) * size / (size - 1), (y1 - y0) * size / (size - 1)
    areas.append(bw * bh / (h * w))
    aspects.append(bw / bh)
  assert 0.28 < min(areas) and max(areas) < 0.62 and np.ptp(areas) > 0.2
  assert 0.48 < min(aspects) and max(aspects) < 2.1 and min(aspects) < 0.8 < 1.3 < max(aspects)


def test_crop_box_falls_back_to_the_center_within_the_ratio():
  rng = np.random.default_rng(0)
  # A 10:1 strip cannot hold any box of aspect <= 4/3 and area >= 90%: center, aspect 4/3.
  assert augment.crop_box(rng, 10, 100, (0.9, 1.0), (3 / 4, 4 / 3)) == (43, 0, 56, 10)
  # A square with scale 1 and ratio 1: the whole image, every time.
  assert augment.crop_box(rng, 50, 50, (1.0, 1.0), (1.0, 1.0)) == (0, 0, 50, 50)


def test_flip_mirrors_about_half_the_views_and_only_when_asked():
  image = coordinate_image(32, 32)
  rng = np.random.default_rng(0)
  def mirrored(flip):
    views = [augment.random_resized_crop(image, rng, 32, (1, 1), (1, 1), flip) for _ in range(400)]
    return np.mean([v[0, 0, 0] > v[0, -1, 0] for v in views])
  assert mirrored(False) == 0
  assert 0.4 < mirrored(True) < 0.6


@pytest.mark.parametrize("shape", [(48, 80), (90, 33), (64, 64), (20, 30)])
def test_eval_view_is_what_the_clip_image_processor_makes(shape):
  """The exported CLIP processor (transformers) sees the same pixels as jaxret's evaluation."""
  from transformers import CLIPImageProcessorPil
  image = np.random.default_rng(1).integers(0, 256, shape + (3,), dtype=np.uint8)
  proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                               do_rescale=False, do_normalize=False)
  want = proc(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0]
  got = augment.resize_center_crop(image, 32)
  assert got.shape == (32, 32, 3)
  np.testing.assert_allclose(got.astype(float), np.moveaxis(want, 0, -1), atol=1)


# ---------------------------------------------------------------- mixtures


def marked_dir(root, source_id, n, tokenizer_from):
  """Records whose pixel (0, 0) holds (index % 256, index // 256, source_id)."""
  records = []
  for i in range(n):
    r = good_record(i)
    px = np.array(Image.open(io.BytesIO(r["image"])))
    px[0, 0] = (i % 256, i // 256, source_id)
    r["image"] = encode(Image.fromarray(px))
    records.append(msgpack.packb(r))
  return write_dir(root / f"src{source_id}", records, tokenizer_from=tokenizer_from)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, demo_dir):
  root = tmp_path_factory.mktemp("mix")
  tok = os.path.join(demo_dir, "tokenizer.json")
  return marked_dir(root, 1, 60, tok), marked_dir(root, 2, 200, tok)


def mixed(two_sources, **kw):
  a, b = two_sources
  return pipeline.train_iterator(a, batch_size=20, text_len=8, seed=0, process_index=0,
                                 process_count=1, mixture=[(a, 3.0), (b, 1.0)], **kw)


def test_mixture_draws_sources_by_weight_and_each_epoch_of_a_source_is_a_permutation(two_sources):
  it = mixed(two_sources)
  ids = [tuple(int(v) for v in px) for _ in range(24) for px in next(it)["image"][:, 0, 0]]
  source = np.array([s for _, _, s in ids])
  assert abs((source == 1).mean() - 0.75) < 0.02  # 3:1
  first = [(r, g) for r, g, s in ids if s == 1][:60]  # the small source's first epoch
  assert sorted(r + 256 * g for r, g in first) == list(range(60))
  second = [(r, g) for r, g, s in ids if s == 1][60:120]
  assert sorted(second) == sorted(first) and second != first


def test_mixture_resumes_exactly(two_sources):
  it = mixed(two_sources, augment=dict(crop_scale=(0.5, 1), crop_ratio=(0.75, 1.33), flip=True))
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  fresh = mixed(two_sources, augment=dict(crop_scale=(0.5, 1), crop_ratio=(0.75, 1.33), flip=True))
  fresh.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(fresh)["image"], w["image"])


def test_mixture_sources_must_share_the_tokenizer(two_sources, tmp_path):
  a, b = two_sources
  other = tmp_path / "other"
  other.mkdir()
  for name in os.listdir(b):
    (other / name).write_bytes((b / name).read_bytes())
  spec = json.loads((other / "tokenizer.json").read_text())
  spec["added_tokens"] = spec.get("added_tokens", []) + [{"id": 99999, "content": "[NEW]",
                                                           "special": True}]
  (other / "tokenizer.json").write_text(json.dumps(spec))
  with pytest.raises(UserError, match="different tokenizer.*--tokenizer"):
    pipeline.train_iterator(a, batch_size=4, text_len=8, seed=0, process_index=0,
                            process_count=1, mixture=[(a, 1), (other, 1)])


def test_mixture_entries_parse_with_clear_errors():
  assert sources.parse_mixture(["gs://b/laion:0.7", "/data/coco", "x:2"]) == [
      ("gs://b/laion", 0.7), ("/data/coco", 1.0), ("x", 2.0)]
  for bad in ("laion:0", "laion:-1", "laion:heavy"):
    with pytest.raises(UserError, match="positive weight"):
      sources.parse_mixture([bad])

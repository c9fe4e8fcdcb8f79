"""Tests for jaxret.data: demo builder, sources, tokenizer, transforms, pipelines.

Expected values come from independent references (raw source files, pixel
arithmetic, a separate caption parser, hashlib), not from the code under test.
"""

import collections
import gzip
import hashlib
import io
import itertools
import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

from jaxret.data import demo, pipeline, sources, tokenizers, transforms
from jaxret.errors import UserError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
HAVE_FASHION = (FASHION_DIR / "train-labels-idx1-ubyte.gz").is_file()

CLASSES = {
    "fashion-mnist": ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                      "sneaker", "bag", "ankle boot"],
    "digits": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
}
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
       "magenta": (255, 0, 255), "cyan": (0, 255, 255), "orange": (255, 165, 0),
       "white": (255, 255, 255)}
CELL_ORIGIN = {"top left": (0, 0), "top right": (0, 32), "bottom left": (32, 0),
               "bottom right": (32, 32)}
NUM_TRAIN, NUM_TEST = 400, 50
AUGMENT = dict(crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True)

SOURCES = ["digits", pytest.param("fashion-mnist", marks=pytest.mark.skipif(
    not HAVE_FASHION, reason="Debian dataset-fashion-mnist not installed"))]


# ---------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module", params=SOURCES)
def built(request, tmp_path_factory):
  """(data_dir, source): a small demo build, once per source per module."""
  out = tmp_path_factory.mktemp(request.param)
  demo.build_demo(out, num_train=NUM_TRAIN, num_test=NUM_TEST, source=request.param,
                  progress=False)
  return out, request.param


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("digits_only")
  demo.build_demo(out, num_train=NUM_TRAIN, num_test=NUM_TEST, source="digits", progress=False)
  return out


def read_split(data_dir, split):
  """All records of a split, decoded with the raw array_record reader + msgpack."""
  manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
  records = []
  for name in manifest["splits"][split]["files"]:
    reader = ArrayRecordReader(str(Path(data_dir) / name))
    records += [msgpack.unpackb(r) for r in reader.read_all()]
    reader.close()
  return records


def png_pixels(png):
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def read_idx(path):
  raw = gzip.open(path).read()
  _, dtype, ndim = struct.unpack(">HBB", raw[:4])
  assert dtype == 0x08
  dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  return np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(dims)


def row_col(cell):
  return CELL_ORIGIN[cell][0] // 32, CELL_ORIGIN[cell][1] // 32


_COLOUR = "|".join(RGB)
_CLASS = "|".join(sorted(CLASSES["fashion-mnist"] + CLASSES["digits"], key=len, reverse=True))
_ITEM = rf"(a|an) ({_COLOUR}) ({_CLASS})"
_CELL = "|".join(CELL_ORIGIN)
ABSOLUTE = re.compile(rf"^{_ITEM} in the ({_CELL}) and {_ITEM} in the ({_CELL})$")
RELATIVE = re.compile(rf"^{_ITEM} ((?:above|below)(?: and to the (?:left|right) of)?"
                      rf"|to the (?:left|right) of) {_ITEM}$")


def parse_caption(caption):
  """-> ('abs', {(class, colour, cell), ...}) or ('rel', x, y, vertical, horizontal)."""
  if m := ABSOLUTE.match(caption):
    art1, col1, cls1, cell1, art2, col2, cls2, cell2 = m.groups()
    for art, col in ((art1, col1), (art2, col2)):
      assert art == ("an" if col[0] in "aeiou" else "a"), caption
    return "abs", {(cls1, col1, cell1), (cls2, col2, cell2)}
  m = RELATIVE.match(caption)
  assert m, f"caption does not parse: {caption!r}"
  art1, col1, cls1, relation, art2, col2, cls2 = m.groups()
  for art, col in ((art1, col1), (art2, col2)):
    assert art == ("an" if col[0] in "aeiou" else "a"), caption
  vertical = relation.split()[0] if relation.split()[0] in ("above", "below") else None
  horizontal = next((f"to the {side} of" for side in ("left", "right") if side in relation), None)
  return "rel", (cls1, col1), (cls2, col2), vertical, horizontal


def key_of(record):
  return tuple(sorted(tuple(t) for t in record["meta"]["items"]))


def image_digest(image):
  return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


# ---------------------------------------------------------------- demo builder


def test_manifest_counts_files_and_hashes(built):
  data_dir, source = built
  manifest = json.loads((data_dir / "manifest.json").read_text())
  assert manifest["format"] == "jaxret-records-v1" and manifest["name"] == "demo"
  assert manifest["source"] == source
  assert manifest["image_size"] == 64
  assert manifest["classes"] == CLASSES[source]
  assert manifest["colours"] == list(RGB)
  on_disk = sorted(p.name for p in data_dir.glob("*.array_record"))
  listed = sorted(f for s in manifest["splits"].values() for f in s["files"])
  assert on_disk == listed
  assert len(manifest["splits"]["train"]["files"]) == 4
  assert manifest["splits"]["test"]["files"] == ["test-00000-of-00001.array_record"]
  for split, want in (("train", NUM_TRAIN), ("test", NUM_TEST)):
    info = manifest["splits"][split]
    assert info["num_records"] == want == len(read_split(data_dir, split))
    for name in info["files"]:
      assert info["sha256"][name] == hashlib.sha256((data_dir / name).read_bytes()).hexdigest()


def test_scene_pixels_match_meta_colours_and_cells(built):
  data_dir, _ = built
  for split in ("train", "test"):
    for record in read_split(data_dir, split)[:150]:
      image = png_pixels(record["image"])
      assert image.shape == (64, 64, 3)
      items = {cell: colour for _, colour, cell in record["meta"]["items"]}
      assert len(items) == 2  # two items, two different cells
      for cell, (y, x) in CELL_ORIGIN.items():
        region = image[y:y + 32, x:x + 32].astype(np.float64)
        if cell not in items:
          assert not region.any(), f"cell {cell} should be black"
          continue
        # max channel == gray: every colour has a 255 channel. Rounding error of a
        # ratio is <= 0.5 / 64 for these pixels.
        bright = region[region.max(-1) >= 64]
        assert len(bright) >= 20, f"item in {cell} is missing or invisible"
        ratios = bright / bright.max(-1, keepdims=True)
        np.testing.assert_allclose(ratios, np.broadcast_to(
            np.array(RGB[items[cell]]) / 255, ratios.shape), atol=0.01)


def test_items_come_from_the_named_class(built):
  data_dir, source = built
  if source == "digits":
    from sklearn.datasets import load_digits
    labels = {"train": load_digits().target, "test": load_digits().target}
  else:
    files = {"train": "train", "test": "t10k"}
    labels = {s: read_idx(FASHION_DIR / f"{f}-labels-idx1-ubyte.gz") for s, f in files.items()}
    images = {s: read_idx(FASHION_DIR / f"{f}-images-idx3-ubyte.gz") for s, f in files.items()}
  used = {}
  for split in ("train", "test"):
    used[split] = set()
    for record in read_split(data_dir, split):
      image = png_pixels(record["image"])
      for (cls, colour, cell), index in zip(record["meta"]["items"],
                                            record["meta"]["source_index"]):
        assert CLASSES[source][labels[split][index]] == cls
        used[split].add(index)
        if source == "fashion-mnist":
          # A colour with a 255 channel keeps the gray value exactly in that channel:
          # the source image must appear there, shifted by at most 2 px from centre.
          channel = int(np.argmax(RGB[colour]))
          y, x = CELL_ORIGIN[cell]
          region = image[y:y + 32, x:x + 32, channel]
          assert any(np.array_equal(region[dy:dy + 28, dx:dx + 28], images[split][index])
                     for dy in range(5) for dx in range(5)), (cls, cell)
  if source == "digits":  # Both pools index one array: they must not share images.
    assert not used["train"] & used["test"]


def caption_form(caption, items):
  """Checks that `caption` is true of the scene `items`; returns 'abs' or 'rel'."""
  parsed = parse_caption(caption)
  if parsed[0] == "abs":
    assert parsed[1] == set(items), caption
    return "abs"
  cell_of = {(cls, colour): cell for cls, colour, cell in items}
  _, x, y, vertical, horizontal = parsed
  (rx, cx), (ry, cy) = row_col(cell_of[x]), row_col(cell_of[y])
  assert vertical == {-1: "above", 0: None, 1: "below"}[np.sign(rx - ry)], caption
  assert horizontal == {-1: "to the left of", 0: None, 1: "to the right of"}[
      np.sign(cx - cy)], caption
  return "rel"


def test_captions_parse_back_to_the_scene(built):
  data_dir, source = built
  for split in ("train", "test"):
    for record in read_split(data_dir, split):
      items = [tuple(t) for t in record["meta"]["items"]]
      assert all(c in CLASSES[source] for c, _, _ in items)
      assert len({(cls, colour) for cls, colour, _ in items}) == 2  # unambiguous names
      # Reading order (top left first) in meta, and captions[0] names them in that order.
      cells = [list(CELL_ORIGIN).index(cell) for _, _, cell in items]
      assert cells == sorted(cells)
      want = ABSOLUTE.match(record["captions"][0]).groups()
      assert (want[2], want[1], want[3]) == items[0] and (want[6], want[5], want[7]) == items[1]
      forms = collections.Counter(caption_form(c, items) for c in record["captions"])
      assert forms == {"abs": 2, "rel": 2}
      assert len(set(record["captions"])) == len(record["captions"])


def test_caption_check_catches_wrong_captions(data_dir):
  """The checker above is not vacuous: swapped positions or colours fail it."""
  record = read_split(data_dir, "test")[0]
  items = [tuple(t) for t in record["meta"]["items"]]
  swaps = {"left": "right", "right": "left", "above": "below", "below": "above",
           "top": "bottom", "bottom": "top"}
  for caption in record["captions"]:
    wrong = re.sub(r"\b(left|right|above|below|top|bottom)\b", lambda m: swaps[m[1]], caption)
    with pytest.raises(AssertionError):
      caption_form(wrong, items)
  (cls, colour, _), other = items[0], items[1]
  recoloured = record["captions"][0].replace(f" {colour} {cls}", f" {other[1]} {cls}", 1)
  if (cls, other[1]) != other[:2]:
    with pytest.raises((AssertionError, KeyError)):
      caption_form(recoloured, items)


def test_rebuild_with_other_shard_count_leaves_no_stale_shards(tmp_path):
  demo.build_demo(tmp_path, num_train=2, num_test=1, source="digits", progress=False)
  assert len(list(tmp_path.glob("train-*-of-00002.array_record"))) == 2
  demo.build_demo(tmp_path, num_train=8, num_test=1, source="digits", progress=False)
  assert sorted(p.name for p in tmp_path.glob("*.array_record")) == [
      "test-00000-of-00001.array_record"] + [f"train-0000{k}-of-00004.array_record"
                                            for k in range(4)]


def test_held_out_combinations(built, tmp_path):
  data_dir, source = built
  train_keys = {key_of(r) for r in read_split(data_dir, "train")}
  test_keys = [key_of(r) for r in read_split(data_dir, "test")]
  assert len(set(test_keys)) == len(test_keys), "test keys must be unique"
  assert not train_keys & set(test_keys), "train and test share a combination"
  assert all(demo.is_test_key(k) for k in test_keys)
  assert not any(demo.is_test_key(k) for k in train_keys)
  # The held-out set does not depend on the seed: another seed's train split avoids it too.
  other = demo.build_demo(tmp_path, num_train=NUM_TRAIN, num_test=5, seed=7, source=source,
                          progress=False)
  assert other["params"]["seed"] == 7
  assert not {key_of(r) for r in read_split(tmp_path, "train")} & set(test_keys)


def test_about_ten_percent_of_keys_are_held_out():
  looks = list(itertools.product(CLASSES["fashion-mnist"], RGB))
  keys = [tuple(sorted(((*a, ca), (*b, cb))))
          for ca, cb in itertools.combinations(CELL_ORIGIN, 2)
          for a, b in itertools.product(looks, looks) if a != b]
  share = np.mean([demo.is_test_key(k) for k in keys])
  assert 0.08 < share < 0.12


def test_build_is_deterministic_and_skips_when_done(data_dir, tmp_path, capsys):
  again = demo.build_demo(tmp_path / "a", num_train=NUM_TRAIN, num_test=NUM_TEST,
                          source="digits", progress=False)
  first = json.loads((data_dir / "manifest.json").read_text())
  assert again["splits"] == first["splits"]  # same sha256 for every file
  mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
  same = demo.build_demo(tmp_path / "a", num_train=NUM_TRAIN, num_test=NUM_TEST,
                         source="digits", progress=True)
  assert same == again
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == mtimes
  assert "already built" in capsys.readouterr().out
  changed = demo.build_demo(tmp_path / "a", num_train=NUM_TRAIN, num_test=NUM_TEST, seed=1,
                            source="digits", progress=False)
  assert changed["splits"]["train"]["sha256"] != again["splits"]["train"]["sha256"]


def test_auto_falls_back_to_digits_and_says_so(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(demo, "FASHION_MNIST_DIR", tmp_path / "absent")
  manifest = demo.build_demo(tmp_path / "out", num_train=8, num_test=4, source="auto")
  assert manifest["source"] == "digits"
  assert "digits" in capsys.readouterr().out
  with pytest.raises(UserError, match="absent.*dataset-fashion-mnist"):
    demo.build_demo(tmp_path / "out2", num_train=8, num_test=4, source="fashion-mnist")


def test_demo_argument_errors(tmp_path):
  with pytest.raises(UserError, match="did you mean 'digits'"):
    demo.build_demo(tmp_path, num_train=8, num_test=4, source="digit")
  with pytest.raises(UserError, match="num_test=100000"):
    demo.build_demo(tmp_path, num_train=8, num_test=100000, source="digits")
  with pytest.raises(UserError, match="positive"):
    demo.build_demo(tmp_path, num_train=0, num_test=4, source="digits")


# ---------------------------------------------------------------- sources


def test_open_split_reads_the_records(data_dir):
  src = sources.open_split(data_dir, "test")
  raw = read_split(data_dir, "test")
  assert len(src) == NUM_TEST
  assert sources.decode_record(src[3]) == raw[3]


def test_missing_data_dir_and_manifest(tmp_path):
  with pytest.raises(UserError, match=re.escape(str(tmp_path / "nope")) + ".*jaxret data demo"):
    sources.load_manifest(tmp_path / "nope")
  with pytest.raises(UserError, match="has no manifest.json"):
    sources.load_manifest(tmp_path)
  (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
  with pytest.raises(UserError, match="something-else"):
    sources.load_manifest(tmp_path)
  (tmp_path / "manifest.json").write_text("{not json")
  with pytest.raises(UserError, match="not valid JSON"):
    sources.load_manifest(tmp_path)


def test_unknown_split_names_the_valid_ones(data_dir):
  with pytest.raises(UserError, match="did you mean 'test'.*valid splits: test, train"):
    sources.open_split(data_dir, "tset")


def test_missing_shard_names_its_path(data_dir, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(data_dir, copy)
  (copy / "train-00002-of-00004.array_record").unlink()
  with pytest.raises(UserError, match=re.escape(str(copy / "train-00002-of-00004.array_record"))):
    sources.open_split(copy, "train")
  with pytest.raises(UserError, match="train-00002"):
    pipeline.train_iterator(copy, batch_size=4, text_len=8, seed=0, process_index=0,
                            process_count=1)


def test_corrupt_record_is_a_user_error():
  with pytest.raises(UserError, match="corrupt record"):
    sources.decode_record(b"\xc1\x00garbage")
  with pytest.raises(UserError, match="captions"):
    sources.decode_record(msgpack.packb({"image": b""}))


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok(data_dir):
  return tokenizers.load_tokenizer(data_dir / "tokenizer.json", 16)


def token_id(data_dir, word):
  """Reference ids straight from the HF library, not through our wrapper."""
  import tokenizers as hf
  ids = hf.Tokenizer.from_file(str(data_dir / "tokenizer.json")).encode(
      word, add_special_tokens=False).ids
  assert len(ids) == 1, f"demo word {word!r} is not one token: {ids}"
  return ids[0]


def test_tokenizer_round_trips_every_caption(built):
  data_dir, source = built
  manifest = json.loads((data_dir / "manifest.json").read_text())
  captions = [c for s in ("train", "test") for r in read_split(data_dir, s) for c in r["captions"]]
  wide = tokenizers.load_tokenizer(data_dir / "tokenizer.json", manifest["max_text_len"])
  ids = wide.encode_batch(captions)
  assert ids.shape == (len(captions), manifest["max_text_len"]) and ids.dtype == np.int32
  unk = token_id(data_dir, "[UNK]")
  assert not (ids == unk).any(), "caption words missing from the vocabulary"
  assert (ids[:, -1] != wide.pad_id).any(), "max_text_len is larger than needed"
  for caption, row in zip(captions, ids):
    assert wide.decode(row) == caption
    assert (row != wide.pad_id).sum() == len(caption.split()) + 2  # no truncation
  mixed = {"digits": "A Red ZERO above a blue Seven",
           "fashion-mnist": "A Red SNEAKER above a blue T-Shirt"}[source]
  assert wide.decode(wide.encode(mixed)) == mixed.lower()


def test_tokenizer_layout_padding_and_truncation(tok, data_dir):
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size > 4
  ids = tok.encode("a red zero")
  words = [token_id(data_dir, w) for w in ("a", "red", "zero")]
  assert ids.dtype == np.int32 and ids.shape == (16,)
  assert ids.tolist() == [1, *words, 2] + [0] * 11
  batch = tok.encode_batch(["a red zero", "a"])
  assert batch.shape == (2, 16) and batch[1].tolist() == [1, token_id(data_dir, "a"), 2] + [0] * 13
  # Byte-level BPE: an unseen word is spelled in smaller pieces, never [UNK].
  unseen = tok.encode("a purple zero")
  assert 3 not in unseen.tolist() and (unseen != 0).sum() > 5
  assert tok.decode(unseen) == "a purple zero"


def test_tokenizer_truncation_keeps_eos(data_dir):
  t = tokenizers.load_tokenizer(data_dir / "tokenizer.json", 4)
  text = "a red zero above a blue one"
  full = tokenizers.load_tokenizer(data_dir / "tokenizer.json", 32).encode(text)
  assert t.encode(text).tolist() == [1, *full[1:3].tolist(), 2]
  exact = tokenizers.load_tokenizer(data_dir / "tokenizer.json", 5).encode("a red zero")
  assert exact.tolist() == [1, *full[1:4].tolist(), 2]
  assert t.decode(t.encode(text)) == "a red"


def test_tokenizer_json_works_in_plain_hf(data_dir):
  import tokenizers as hf
  hf_tok = hf.Tokenizer.from_file(str(data_dir / "tokenizer.json"))
  enc = hf_tok.encode("a red zero")
  assert enc.tokens == ["[BOS]", "a</w>", "red</w>", "zero</w>", "[EOS]"]
  assert hf_tok.decode(enc.ids) == "a red zero"


def test_tokenizer_errors(tmp_path, data_dir):
  with pytest.raises(UserError, match=re.escape(str(tmp_path / "tok.json"))):
    tokenizers.load_tokenizer(tmp_path / "tok.json", 8)
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(UserError, match="not a valid"):
    tokenizers.load_tokenizer(tmp_path / "bad.json", 8)
  with pytest.raises(UserError, match="at least 2"):
    tokenizers.load_tokenizer(data_dir / "tokenizer.json", 1)


# ---------------------------------------------------------------- transforms / pipelines


def test_transforms_pickle(data_dir):
  tokenize = transforms.Tokenize(data_dir / "tokenizer.json", 8)
  element = {"image": None, "caption": "a red zero"}
  tokenize.map(element)  # loads the HF tokenizer
  clone = pickle.loads(pickle.dumps(tokenize))
  assert clone._tokenizer is None
  np.testing.assert_array_equal(clone.map(element)["text"], tokenize.map(element)["text"])
  for t in (transforms.DecodeRecord(), transforms.TrainView(32, AUGMENT), transforms.CenterCrop(32)):
    pickle.loads(pickle.dumps(t))


def train_it(data_dir, **kw):
  args = dict(batch_size=50, text_len=24, seed=0, process_index=0, process_count=1)
  return pipeline.train_iterator(data_dir, **{**args, **kw})


def test_train_batches_are_records_with_any_caption(data_dir, tok):
  records = read_split(data_dir, "train")
  by_image = {image_digest(png_pixels(r["image"])): r for r in records}
  wide = tokenizers.load_tokenizer(data_dir / "tokenizer.json", 24)
  it = train_it(data_dir)
  choices = collections.Counter()
  for _ in range(8):  # one epoch
    batch = next(it)
    assert set(batch) == {"image", "text"}
    assert batch["image"].shape == (50, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (50, 24) and batch["text"].dtype == np.int32
    for image, text in zip(batch["image"], batch["text"]):
      record = by_image[image_digest(image)]
      choices[record["captions"].index(wide.decode(text))] += 1
  assert set(choices) == {0, 1, 2, 3}, "training should sample every paraphrase"


def epoch_digests(it, batches):
  return [image_digest(im) for _ in range(batches) for im in next(it)["image"]]


def test_each_epoch_is_a_new_permutation(data_dir):
  it = train_it(data_dir)
  first, second = epoch_digests(it, 8), epoch_digests(it, 8)
  assert len(set(first)) == NUM_TRAIN and sorted(first) == sorted(second)
  assert first != second
  other_seed = epoch_digests(train_it(data_dir, seed=1), 8)
  assert other_seed != first and sorted(other_seed) == sorted(first)


def test_resume_is_exact_across_epochs(data_dir):
  it = train_it(data_dir, batch_size=32, augment=AUGMENT)  # random crops and flips too
  for _ in range(11):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]  # crosses the epoch boundary (12 * 32 < 400 < 13 * 32)
  fresh = train_it(data_dir, batch_size=32, augment=AUGMENT)
  fresh.set_state(json.loads(json.dumps(state)))  # state must survive serialisation
  for w in want:
    got = next(fresh)
    np.testing.assert_array_equal(got["image"], w["image"])
    np.testing.assert_array_equal(got["text"], w["text"])


def test_resume_through_orbax_checkpoint(data_dir, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  it = train_it(data_dir, batch_size=16)
  next(it), next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  want = next(it)
  fresh = train_it(data_dir, batch_size=16)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(next(fresh)["image"], want["image"])


@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_are_disjoint_and_cover(data_dir, count):
  per = NUM_TRAIN // count
  shards = []
  for index in range(count):
    it = train_it(data_dir, batch_size=per, process_index=index, process_count=count)
    shards.append(epoch_digests(it, 1))
  everything = collections.Counter(image_digest(png_pixels(r["image"]))
                                   for r in read_split(data_dir, "train"))
  union = collections.Counter(d for s in shards for d in s)
  assert all(len(set(s)) == per for s in shards)
  assert sum(union.values()) == len(union) == per * count  # disjoint
  assert not union - everything and len(everything - union) == NUM_TRAIN - per * count


@pytest.mark.parametrize("count", [2, 4])
def test_global_batch_does_not_depend_on_the_process_count(data_dir, count):
  """Process shards of step k, concatenated in process order, are the one-process batch k
  (so a multi-host run trains on exactly the batches of a single-host run)."""
  per = 8
  whole = train_it(data_dir, batch_size=per * count, process_index=0, process_count=1)
  parts = [train_it(data_dir, batch_size=per, process_index=p, process_count=count)
           for p in range(count)]
  for _ in range(NUM_TRAIN // (per * count) + 2):  # past an epoch boundary
    want = next(whole)
    got = [next(it) for it in parts]
    for key in ("image", "text"):
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def test_default_process_shard_comes_from_jax(data_dir):
  batch = next(pipeline.train_iterator(data_dir, batch_size=8, text_len=8, seed=0))
  assert batch["image"].shape[0] == 8


def test_train_iterator_errors(data_dir):
  with pytest.raises(UserError, match="fewer than one global batch"):
    train_it(data_dir, batch_size=NUM_TRAIN + 1)
  with pytest.raises(UserError, match="valid splits"):
    train_it(data_dir, split="validation")
  with pytest.raises(UserError, match="at least 2"):
    train_it(data_dir, text_len=1)

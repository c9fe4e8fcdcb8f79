"""Swapped caption variants (jaxret/data/caption_swaps.py) against hand-written expectations, and
the demo's variants against the demo's own scene space: never the true scene, always a real one."""
import numpy as np
import pytest

from jaxret.data import caption_swaps, demo
from jaxret.data.caption_swaps import demo_swaps, rule_swaps, swaps_for_record
from jaxret.errors import UserError

SCENE = [["sneaker", "red", "top left"], ["bag", "blue", "bottom right"]]


def two(first, second):
  """The demo's canonical caption template, written out here."""
  return f"{first} in the top left and {second} in the bottom right"


# --- demo scenes ---------------------------------------------------------------------------


def test_demo_swaps_of_a_hand_written_scene():
  got = demo_swaps(SCENE)
  others = ("green", "yellow", "magenta", "cyan", "orange", "white")  # not red, not blue
  art = lambda colour: "an" if colour == "orange" else "a"
  assert got["attribute"] == (
      [two("a blue sneaker", "a red bag")]  # the exchange first
      + [two(f"{art(c)} {c} sneaker", "a blue bag") for c in others]
      + [two("a red sneaker", f"{art(c)} {c} bag") for c in others])
  fashion = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "ankle boot")
  assert got["object"] == (
      [two("a red bag", "a blue sneaker")]
      + [two(f"a red {c}", "a blue bag") for c in fashion]
      + [two("a red sneaker", f"a blue {c}") for c in fashion])
  # The same words in the same order, the positions exchanged; then one item moved to each
  # free cell (top right, bottom left), the sneaker first.
  assert got["relation"] == [
      "a red sneaker in the bottom right and a blue bag in the top left",
      "a red sneaker in the top right and a blue bag in the bottom right",
      "a red sneaker in the bottom left and a blue bag in the bottom right",
      "a red sneaker in the top left and a blue bag in the top right",
      "a red sneaker in the top left and a blue bag in the bottom left"]


def test_demo_swaps_drop_what_describes_the_same_scene():
  # One colour for both items: exchanging colours changes nothing.
  same_colour = demo_swaps([["bag", "red", "top left"], ["coat", "red", "top right"]])
  assert same_colour["attribute"][0] == ("a green bag in the top left and a red coat in the "
                                         "top right")
  assert "a red bag in the top left and a red coat in the top right" not in same_colour["attribute"]
  assert len(same_colour["attribute"]) == 2 * 7  # 7 colours other than red, for each item
  # One class for both: exchanging classes changes nothing; digits replace from the digits.
  same_class = demo_swaps([["one", "red", "top left"], ["one", "blue", "bottom left"]])
  assert same_class["object"][:2] == [
      "a red zero in the top left and a blue one in the bottom left",
      "a red two in the top left and a blue one in the bottom left"]
  assert len(same_class["object"]) == 2 * 9
  assert same_class["relation"] == [
      "a red one in the bottom left and a blue one in the top left",
      "a red one in the top right and a blue one in the bottom left",
      "a red one in the bottom right and a blue one in the bottom left",  # b now reads first
      "a red one in the top left and a blue one in the top right",
      "a red one in the top left and a blue one in the bottom right"]


def test_demo_swaps_cap_and_seed():
  for seed in range(5):
    got = demo_swaps(SCENE, k=3, rng=seed)
    assert got == demo_swaps(SCENE, k=3, rng=np.random.default_rng(seed))
    everything = demo_swaps(SCENE)
    for t in caption_swaps.TYPES:
      assert len(got[t]) == min(3, len(everything[t]))
      assert got[t][0] == everything[t][0]  # the exchange is always kept
      # a subset, in the full list's order
      assert [c for c in everything[t] if c in got[t]] == got[t]
  assert len({tuple(demo_swaps(SCENE, k=3, rng=s)["object"]) for s in range(10)}) > 1
  assert demo_swaps(SCENE, k=0) == {t: [] for t in caption_swaps.TYPES}


def test_demo_variants_are_captions_of_other_valid_scenes():
  """For random scenes of both item sources: no variant is a caption of the true scene, and
  each is a caption of some valid scene (so it describes another one)."""
  rng = np.random.default_rng(0)
  for classes in (demo.FASHION_MNIST_CLASSES, demo.DIGIT_CLASSES):
    scenes = demo._all_scenes(classes)
    every_caption = {c for s in scenes for c in demo.captions_for(s)}
    for i in rng.choice(len(scenes), 200, replace=False):
      items = scenes[i]
      true = set(demo.captions_for(items))
      got = demo_swaps(items, k=4, rng=int(i), classes=classes)
      assert got["relation"] and got["attribute"] and got["object"]
      for t, variants in got.items():
        assert len(variants) == len(set(variants)) <= 4
        for v in variants:
          assert v not in true and v in every_caption, (items, t, v)


def test_malformed_demo_items_are_one_line_errors():
  for items in ([["bag", "red", "top left"]],
                [["bag", "red", "middle"], ["cup", "red", "top left"]],
                [["bag", "red", "top left"], ["cup", "blue", "top left"]]):
    with pytest.raises(UserError, match="is not a demo scene.*rebuild the demo data") as e:
      demo_swaps(items)
    assert "\n" not in str(e.value)


# --- any caption ---------------------------------------------------------------------------


def test_rule_swaps_by_hand():
  got = rule_swaps("A red car and an orange bus", k=1)
  assert got == {"attribute": ["An orange car and a red bus"],   # articles follow the words
                 "object": ["A red bus and an orange car"], "relation": []}
  assert rule_swaps("a cat on the left of a dog")["relation"] == [
      "a cat under the left of a dog", "a cat on the right of a dog"]
  got = rule_swaps("Two Dogs in front of a white house", k=1)
  assert got["relation"] == ["Two Dogs behind a white house"]     # a phrase, case kept
  assert got["object"] == ["Two Houses in front of a white dog"]  # each place keeps its count
  assert rule_swaps("two dogs and a cat", k=1)["object"] == ["two cats and a dog"]
  assert rule_swaps("an apple and a banana", k=1)["object"] == ["a banana and an apple"]
  assert rule_swaps("a hot dog on a plate", k=1)["object"] == ["a plate on a hot dog"]
  assert rule_swaps("a man on top of a horse")["relation"] == ["a man underneath a horse"]
  assert rule_swaps("three birds")["attribute"] == [
      "two birds", "four birds", "five birds", "six birds", "seven birds", "eight birds",
      "nine birds", "ten birds"]
  assert rule_swaps("2 cats")["attribute"] == [f"{n} cats" for n in (3, 4, 5, 6, 7, 8, 9, 10)]


def test_rule_swaps_words_and_case():
  colours = rule_swaps("a RED car")["attribute"]
  assert "a BLUE car" in colours and "an ORANGE car" in colours
  assert len(colours) == 19  # 21 colour words, less red and the second spelling of gray
  grey = rule_swaps("a grey horse")["attribute"]
  assert "a gray horse" not in grey and "a blue horse" in grey and len(grey) == 19
  # Whole words only: none inside another word or a hyphenated one.
  for caption in ("redwood bushes", "someone is leftover", "a boxer", "a t-shirt", "photograph"):
    assert rule_swaps(caption) == {t: [] for t in caption_swaps.TYPES}, caption
  # Two items of one colour: the exchange changes nothing and is dropped.
  same = rule_swaps("a red car and a red bus")["attribute"]
  assert len(same) == 2 * 19 and same[0] == "an orange car and a red bus"
  assert "a red car and a red bus" not in same
  assert rule_swaps("a red car and a red bus", k=1, rng=4)["attribute"][0] in same


def test_rule_swaps_properties():
  captions = ["A man riding a horse on the beach", "two cats sleeping on a red couch",
              "a blue bus in front of a white building next to 3 cars", "nothing to see",
              "A LARGE ELEPHANT BEHIND A TREE", "people standing inside a green tent"]
  for caption in captions:
    for seed in range(3):
      got = rule_swaps(caption, k=5, rng=seed)
      assert got == rule_swaps(caption, k=5, rng=seed)
      assert set(got) == set(caption_swaps.TYPES)
      for variants in got.values():
        assert len(variants) == len(set(variants)) <= 5
        assert caption not in variants
  assert rule_swaps("nothing to see") == {"attribute": [], "object": [], "relation": []}
  assert rule_swaps("A LARGE ELEPHANT BEHIND A TREE")["relation"] == ["A LARGE ELEPHANT IN FRONT "
                                                                      "OF A TREE"]


def test_swaps_for_record_picks_by_meta():
  meta = {"items": SCENE, "source_index": [1, 2]}
  caption = two("a red sneaker", "a blue bag")
  assert swaps_for_record(meta, caption, 3, 7) == demo_swaps(SCENE, 3, 7)
  assert swaps_for_record({"label": 2}, "a red cat", 3, 7) == rule_swaps("a red cat", 3, 7)
  assert swaps_for_record({}, "a red cat") == rule_swaps("a red cat")

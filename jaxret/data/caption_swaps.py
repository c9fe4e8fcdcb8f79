"""Swapped variants of a caption, one list per swap type: hard negatives that keep most words.

  attribute  a colour or count changed, or two colours exchanged
             "a red car and a blue bus" -> "a blue car and a red bus", "a green car and ..."
  object     two objects exchanged, or one replaced   -> "a red bus and a blue car"
  relation   positions exchanged or one item moved (demo), or a spatial word replaced by its
             opposite

`demo_swaps` reads a demo scene's items and phrases each variant with the demo's own caption
generator, so every variant is the real caption of another valid scene, never of the same one.
`rule_swaps` works on any caption from fixed word lists (whole words, case kept, "a"/"an" fixed
before a replaced word). Both keep at most `k` variants per type: exchanges first (the hardest:
the same words bound differently), then replacements drawn by `rng`, in a fixed order, so the
result depends only on the input and the seed.
"""
import re

import numpy as np

from jaxret.data import demo
from jaxret.errors import UserError

TYPES = ("attribute", "object", "relation")

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
           "white", "gray", "grey", "silver", "gold", "beige", "maroon", "navy", "teal", "cyan",
           "magenta", "violet")
SAME_COLOUR = {"grey": "gray"}  # spellings of one colour: never a swap of each other
# Counts of two and more: "one" is mostly a pronoun ("one of them") and swapping a singular
# count for a plural one breaks the noun's agreement, which would give the negative away.
NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DIGITS = tuple(str(i) for i in range(2, 11))
# (phrase, its opposite); a phrase is matched before the words inside it ("in front of").
RELATIONS = (("left", "right"), ("above", "below"), ("on", "under"), ("in front of", "behind"),
             ("top", "bottom"), ("inside", "outside"), ("upper", "lower"), ("up", "down"),
             ("into", "out of"), ("on top of", "underneath"))
# (singular, plural), COCO-style. Left out: words that are also colours ("orange") and nouns
# whose plural is the singular ("sheep"), whose count a replacement could not keep.
OBJECTS = (
    ("person", "people"), ("man", "men"), ("woman", "women"), ("child", "children"),
    ("boy", "boys"), ("girl", "girls"), ("baby", "babies"), ("dog", "dogs"), ("cat", "cats"),
    ("horse", "horses"), ("cow", "cows"), ("elephant", "elephants"), ("bear", "bears"),
    ("zebra", "zebras"), ("giraffe", "giraffes"), ("bird", "birds"), ("bicycle", "bicycles"),
    ("bike", "bikes"), ("car", "cars"), ("motorcycle", "motorcycles"), ("airplane", "airplanes"),
    ("bus", "buses"), ("train", "trains"), ("truck", "trucks"), ("boat", "boats"),
    ("traffic light", "traffic lights"), ("fire hydrant", "fire hydrants"),
    ("stop sign", "stop signs"), ("bench", "benches"), ("umbrella", "umbrellas"),
    ("backpack", "backpacks"), ("handbag", "handbags"), ("suitcase", "suitcases"),
    ("frisbee", "frisbees"), ("kite", "kites"), ("skateboard", "skateboards"),
    ("surfboard", "surfboards"), ("tennis racket", "tennis rackets"), ("ball", "balls"),
    ("bottle", "bottles"), ("wine glass", "wine glasses"), ("cup", "cups"), ("fork", "forks"),
    ("knife", "knives"), ("spoon", "spoons"), ("bowl", "bowls"), ("plate", "plates"),
    ("banana", "bananas"), ("apple", "apples"), ("sandwich", "sandwiches"), ("pizza", "pizzas"),
    ("hot dog", "hot dogs"), ("donut", "donuts"), ("cake", "cakes"), ("carrot", "carrots"),
    ("chair", "chairs"), ("couch", "couches"), ("bed", "beds"), ("table", "tables"),
    ("toilet", "toilets"), ("sink", "sinks"), ("tv", "tvs"), ("laptop", "laptops"),
    ("keyboard", "keyboards"), ("cell phone", "cell phones"), ("phone", "phones"),
    ("microwave", "microwaves"), ("oven", "ovens"), ("refrigerator", "refrigerators"),
    ("book", "books"), ("clock", "clocks"), ("vase", "vases"), ("teddy bear", "teddy bears"),
    ("toothbrush", "toothbrushes"), ("hat", "hats"), ("tree", "trees"), ("flower", "flowers"),
    ("house", "houses"), ("window", "windows"), ("box", "boxes"), ("bag", "bags"),
    ("shoe", "shoes"))


def _finder(phrases):
  # Longest first, so a phrase wins over the words inside it; a hyphen joins words
  # ("t-shirt" holds no "shirt").
  alternation = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
  return re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])", re.IGNORECASE)


_COLOUR_RE = _finder(COLOURS)
_NUMBER_RE = _finder(NUMBER_WORDS + DIGITS)
_RELATION_RE = _finder([p for pair in RELATIONS for p in pair])
_OPPOSITE = {a: b for pair in RELATIONS for a, b in (pair, pair[::-1])}
_OBJECT_RE = _finder([w for pair in OBJECTS for w in pair])
_LEMMA = {w: (s, number) for s, p in OBJECTS for w, number in ((s, 0), (p, 1))}
_FORMS = {s: (s, p) for s, p in OBJECTS}
_ARTICLE_RE = re.compile(r"(?<![\w-])(an?)(\s+)$", re.IGNORECASE)


def _rng(rng):
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _pick(original, exchanges, replacements, k, rng):
  """Distinct variants other than `original`: every exchange, then replacements (all, or
  k minus the exchanges drawn by `rng`, kept in their order)."""
  seen, out = {original}, ([], [])
  for kept, candidates in zip(out, (exchanges, replacements)):
    for c in candidates:
      if c not in seen:
        seen.add(c)
        kept.append(c)
  exchanges, replacements = out
  if k is None:
    return exchanges + replacements
  room = max(0, k - len(exchanges))
  if room < len(replacements):
    chosen = np.sort(_rng(rng).choice(len(replacements), room, replace=False))
    replacements = [replacements[i] for i in chosen]
  return (exchanges + replacements)[:k]


# ---------------------------------------------------------------- demo scenes


def _scene_classes(items):
  """The demo class list the scene's classes come from (what replacements draw on)."""
  names = {cls for cls, _, _ in items}
  for classes in (demo.FASHION_MNIST_CLASSES, demo.DIGIT_CLASSES):
    if names <= set(classes):
      return classes
  return tuple(sorted(names))


def _check_items(items):
  ok = (isinstance(items, (list, tuple)) and len(items) == 2
        and all(isinstance(t, (list, tuple)) and len(t) == 3 for t in items)
        and all(t[2] in demo.CELLS for t in items) and items[0][2] != items[1][2])
  if not ok:
    raise UserError(f"record meta 'items' {items!r} is not a demo scene (two [class, colour, "
                    "cell] in different cells): rebuild the demo data, or drop 'items' from meta")
  return [tuple(t) for t in items]


def _caption(mentioned):
  """The real caption of the scene that names its items in this order: the scene's canonical
  caption if that is reading order, else its second (the same template, items reversed)."""
  ordered = sorted(mentioned, key=lambda t: demo.CELLS.index(t[2]))
  captions = demo.captions_for(ordered)
  return captions[0] if ordered == list(mentioned) else captions[1]


def demo_swap_scenes(items, *, classes=None, colours=None):
  """{type: (exchanged scenes, replaced scenes)}: the other valid scenes a swap of each type
  makes of `items` (reading order), each as its items in the order the original mentions them
  (the first item's counterpart first). `classes` and `colours` are what replacements draw on
  (default: the demo's)."""
  (cls_a, col_a, cell_a), (cls_b, col_b, cell_b) = items = _check_items(items)
  classes = tuple(classes) if classes else _scene_classes(items)
  colours = tuple(colours) if colours else tuple(demo.COLOURS)
  true_key = demo.combination_key(items)

  def valid(scenes):
    # The same scene (e.g. two items of one colour "exchanging" it) or an impossible one (two
    # items that look the same) is no negative.
    return [sc for sc in scenes if demo.combination_key(sc) != true_key and sc[0][:2] != sc[1][:2]]

  def each_item(field, values):
    present = {t[field] for t in items}
    return [[(*t[:field], v, *t[field + 1:]) if j == i else t for j, t in enumerate(items)]
            for i in (0, 1) for v in values if v not in present]

  exchanged = {
      "attribute": [[(cls_a, col_b, cell_a), (cls_b, col_a, cell_b)]],
      "object": [[(cls_b, col_a, cell_a), (cls_a, col_b, cell_b)]],
      "relation": [[(cls_a, col_a, cell_b), (cls_b, col_b, cell_a)]],
  }
  # Positions: one item moved to a free cell (each item, each free cell, in reading order).
  free = [c for c in demo.CELLS if c not in (cell_a, cell_b)]
  replaced = {"attribute": each_item(1, colours), "object": each_item(0, classes),
              "relation": each_item(2, free)}
  return {t: (valid(exchanged[t]), valid(replaced[t])) for t in TYPES}


def demo_swaps(items, k=None, rng=0, *, classes=None, colours=None):
  """{type: [caption, ...]}: variants of the scene's canonical caption (demo.captions_for(items)
  [0], items in reading order as records store them); each is the real caption of another
  valid scene (demo_swap_scenes)."""
  items = _check_items(items)
  true = demo.captions_for(items)[0]
  rng = _rng(rng)
  return {t: _pick(true, [_caption(sc) for sc in ex], [_caption(sc) for sc in rep], k, rng)
          for t, (ex, rep) in demo_swap_scenes(items, classes=classes, colours=colours).items()}


def _phrased(mentioned, relational):
  """A scene's caption naming its items in this order, in the cell template (", and") or the
  relational one ("above", "to the left of")."""
  ordered = sorted(mentioned, key=lambda t: demo.CELLS.index(t[2]))
  captions = demo.captions_for(ordered)
  first = ordered == list(mentioned)
  return captions[(2 if relational else 0) + (0 if first else 1)]


def demo_swaps_like(items, caption, *, classes=None, colours=None):
  """{type: [caption, ...]}: the swapped scenes of demo_swap_scenes phrased as `caption`, one of
  the scene's own captions (the same template, the counterparts in the same order), so that a
  negative never differs from its positive by phrasing alone; None if `caption` is not one of
  the scene's captions. Variants that read as any caption of the true scene are dropped."""
  items = _check_items(items)
  own = demo.captions_for(items)
  if caption not in own:
    return None
  j = own.index(caption)
  flip, relational = j % 2 == 1, j >= 2
  out = {}
  for t, (ex, rep) in demo_swap_scenes(items, classes=classes, colours=colours).items():
    seen, group = set(own), []
    for sc in ex + rep:
      c = _phrased(list(reversed(sc)) if flip else sc, relational)
      if c not in seen:
        seen.add(c)
        group.append(c)
    out[t] = group
  return out


# ---------------------------------------------------------------- any caption


def _like(source, word):
  """`word` in the case of `source` ("Red" -> "Blue", "RED" -> "BLUE")."""
  if len(source) > 1 and source.isupper():
    return word.upper()
  return word[:1].upper() + word[1:] if source[:1].isupper() else word


def _edit(caption, edits):
  """Applies [(start, end, new words)], each in the case of the words it replaces; an "a" or
  "an" right before a replaced word is made to fit the new word."""
  out = caption
  for start, end, new in sorted(edits, reverse=True):
    out = out[:start] + _like(caption[start:end], new) + out[end:]
    article = _ARTICLE_RE.search(out[:start])
    if article:
      fit = "an" if new[:1].lower() in "aeiou" else "a"
      a, space = article.group(1), article.group(2)
      out = out[:article.start()] + _like(a, fit) + space + out[start:]
  return out


def _colour_key(word):
  word = word.lower()
  return SAME_COLOUR.get(word, word)


def _attribute(caption):
  colours = list(_COLOUR_RE.finditer(caption))
  exchanges = [_edit(caption, [(a.start(), a.end(), b.group().lower()),
                               (b.start(), b.end(), a.group().lower())])
               for i, a in enumerate(colours) for b in colours[i + 1:]
               if _colour_key(a.group()) != _colour_key(b.group())]
  present = {_colour_key(m.group()) for m in colours}
  replacements = [_edit(caption, [(m.start(), m.end(), c)]) for m in colours for c in COLOURS
                  if c not in SAME_COLOUR and c not in present]
  for m in _NUMBER_RE.finditer(caption):
    same_kind = DIGITS if m.group().isdigit() else NUMBER_WORDS
    replacements += [_edit(caption, [(m.start(), m.end(), n)]) for n in same_kind
                     if n != m.group().lower()]
  return exchanges, replacements


def _object(caption):
  nouns = [(m, *_LEMMA[m.group().lower()]) for m in _OBJECT_RE.finditer(caption)]
  # An exchange moves the nouns and keeps each place's count: "two dogs and a cat" ->
  # "two cats and a dog".
  exchanges = [_edit(caption, [(a.start(), a.end(), _FORMS[lb][na]),
                               (b.start(), b.end(), _FORMS[la][nb])])
               for i, (a, la, na) in enumerate(nouns) for b, lb, nb in nouns[i + 1:] if la != lb]
  present = {lemma for _, lemma, _ in nouns}
  replacements = [_edit(caption, [(m.start(), m.end(), pair[number])]) for m, _, number in nouns
                  for pair in OBJECTS if pair[0] not in present]
  return exchanges, replacements


def _relation(caption):
  return [_edit(caption, [(m.start(), m.end(), _OPPOSITE[m.group().lower()])])
          for m in _RELATION_RE.finditer(caption)], []


def rule_swaps(caption, k=None, rng=0):
  """{type: [caption, ...]} for any caption, from the word lists above; a caption with no word
  of a list gets no variant of that type."""
  rng = _rng(rng)
  return {t: _pick(caption, *swap(caption), k, rng)
          for t, swap in zip(TYPES, (_attribute, _object, _relation))}


def swaps_for_record(meta, caption, k=None, rng=0, *, classes=None):
  """A record's variants: its scene's (demo_swaps, of the canonical caption, which is the
  demo's first caption) when its meta has demo "items", else rule_swaps of `caption`."""
  if meta and "items" in meta:
    return demo_swaps(meta["items"], k, rng, classes=classes)
  return rule_swaps(caption, k, rng)

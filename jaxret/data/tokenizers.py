"""Text tokenizers: HF `tokenizers` files in, fixed-length int32 id arrays out.

Every text becomes `[BOS] tokens... [EOS] [PAD]...` of exactly `max_len` ids.
Too long texts lose tokens from the end but keep EOS as the last real token, so a
model that pools at EOS always finds it.

The demo builds a word-level tokenizer here (`build_word_level`); converted
datasets can ship any HF `tokenizer.json` that defines [PAD], [BOS] and [EOS].
"""

from pathlib import Path

import numpy as np
import tokenizers as hf
from tokenizers import models, normalizers, pre_tokenizers, processors

from jaxret.errors import UserError

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # Built with ids 0..3, so padding is id 0.

# Words keep inner hyphens ('t-shirt' is one token, so decoding gives it back
# unchanged); punctuation runs become their own tokens; whitespace is dropped.
_WORD_OR_PUNCT = r"[\w-]+|[^\w\s]+"


def _normalizer():
  return normalizers.Sequence([normalizers.Strip(), normalizers.Lowercase()])


def _pre_tokenizer():
  return pre_tokenizers.Split(hf.Regex(_WORD_OR_PUNCT), behavior="removed", invert=True)


def build_word_level(texts, path):
  """Writes a word-level tokenizer covering every word in `texts` to `path`.

  The vocabulary is the special tokens followed by the sorted words, so it does
  not depend on word frequencies or on the order of `texts`.
  """
  norm, pre = _normalizer(), _pre_tokenizer()
  words = set()
  for text in texts:
    words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
  words -= set(SPECIAL_TOKENS)
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(sorted(words)))}
  tok = hf.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.normalizer = norm
  tok.pre_tokenizer = pre
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  # Only used by people who load tokenizer.json with HF directly: gives them the
  # same BOS/EOS framing that `Tokenizer.encode` below does.
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
  tok.save(str(path))


class Tokenizer:
  """Fixed-length encoder over an HF tokenizer; see the module docstring for the layout."""

  def __init__(self, hf_tokenizer, max_len, path="<tokenizer>"):
    self._tok = hf_tokenizer
    self.max_len = int(max_len)
    ids = {}
    for name in (PAD, BOS, EOS):
      ids[name] = hf_tokenizer.token_to_id(name)
      if ids[name] is None:
        raise UserError(f"tokenizer '{path}' has no {name} token: use a tokenizer.json that "
                        f"defines {PAD}, {BOS} and {EOS} (the demo's does)")
    self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
    self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)

  def _frame(self, encodings):
    out = np.full((len(encodings), self.max_len), self.pad_id, np.int32)
    keep = self.max_len - 2
    for row, enc in zip(out, encodings):
      ids = enc.ids[:keep]
      row[0] = self.bos_id
      row[1:1 + len(ids)] = ids
      row[1 + len(ids)] = self.eos_id
    return out

  def encode_batch(self, texts):
    """list of str -> int32 [len(texts), max_len]."""
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a list of strings; use encode() for one string")
    return self._frame(self._tok.encode_batch(list(texts), add_special_tokens=False))

  def encode(self, text):
    """str -> int32 [max_len]."""
    # Single encode: no thread pool inside HF, so it is cheap per grain element.
    return self._frame([self._tok.encode(text, add_special_tokens=False)])[0]

  def decode(self, ids):
    """ids (any int sequence) -> text, without BOS/EOS/PAD."""
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)


def load_tokenizer(path, max_len):
  """Loads an HF tokenizer.json as a `Tokenizer` producing `max_len` ids per text."""
  path = Path(path)
  if int(max_len) < 2:
    raise UserError(f"text length {max_len} is too short: it must be at least 2 "
                    "(room for BOS and EOS); raise the text length in the config")
  if not path.is_file():
    raise UserError(f"tokenizer file '{path}' not found: rebuild the data with "
                    "`jaxret data demo --out DIR`, or put an HF tokenizer.json there")
  try:
    hf_tok = hf.Tokenizer.from_file(str(path))
  except Exception as e:  # The HF error is a Rust parse message; name the file instead.
    raise UserError(f"tokenizer file '{path}' is not a valid HF tokenizer.json ({e}): "
                    "rebuild the data or replace the file") from None
  return Tokenizer(hf_tok, max_len, path)

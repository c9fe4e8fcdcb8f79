"""Text tokenizers: tokenizer files in, fixed-length int32 id arrays out.

Every text is first cleaned as open_clip does (`clean_text`: ftfy, HTML entities, whitespace;
lower case for tokenizers that lower-case anyway), then becomes `BOS tokens... EOS PAD...` of
exactly `max_len` ids. Too long texts lose tokens from the end but keep EOS as the last real
token (open_clip's truncation), so a model that pools at EOS always finds it.

Files `load_tokenizer` reads (every kind has the same interface: encode_batch, encode, decode,
clean, pad_id, bos_id (None: no start token), eos_id, vocab_size, and to_hf for export):
  * an HF `tokenizer.json` (what `jaxret data train-tokenizer` and the demo write);
  * CLIP's `vocab.json` + `merges.txt` (a folder holding both, or the vocab.json path):
    byte-level BPE with CLIP's cleanup (NFC, whitespace runs -> one space, lower case),
    the same ids as transformers' CLIPTokenizer; OpenAI's files have 49408 tokens and
    context 77 (`read_openai_bpe` builds them from the merges file open_clip ships);
  * a SentencePiece `.model` (SigLIP-style towers; no BOS unless the model has one).
Special tokens come from the file's BOS/EOS template when it has one, else by name: jaxret's
[PAD] [BOS] [EOS], CLIP's <|startoftext|> <|endoftext|>, SentencePiece's <s> </s> <pad>.
Without a pad token, padding is EOS (as transformers pads CLIP with <|endoftext|>).
"""

import gzip
import html
import json
from pathlib import Path

import ftfy
import numpy as np
import tokenizers as hf
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from jaxret.errors import UserError

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # Built with ids 0..3, so padding is id 0.
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI CLIP's word pattern (contractions, letter runs, single digits, symbol runs).
CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"
                r"[\p{N}]|[^\s\p{L}\p{N}]+")
END_OF_WORD = "</w>"

# Words keep inner hyphens ('t-shirt' is one token, so decoding gives it back
# unchanged); punctuation runs become their own tokens; whitespace is dropped.
WORD_OR_PUNCT = r"[\w-]+|[^\w\s]+"


def clean_text(text, lower=False):
  """open_clip's caption cleanup: ftfy's mojibake/unicode fixes, HTML entities unescaped twice
  (web captions are often escaped twice), whitespace runs -> one space, stripped; `lower` as
  Python lower-cases (open_clip's CLIP BPE: final sigma and all, which the HF normalizer's
  per-character lower case does not do)."""
  if not (text.isascii() and text.isprintable() and "&" not in text):
    # ftfy and the entities change only non-ASCII text, control characters and '&...;':
    # printable ASCII skips them (ftfy is pure Python, ~40% of the demo pipeline's time).
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  text = " ".join(text.split())
  return text.lower() if lower else text


def _normalizer():
  return normalizers.Sequence([normalizers.Strip(), normalizers.Lowercase()])


def _pre_tokenizer():
  return pre_tokenizers.Split(hf.Regex(WORD_OR_PUNCT), behavior="removed", invert=True)


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


def _clip_pipeline(tok):
  """CLIP's text cleanup, word split, byte-level alphabet and decoding, set on `tok`."""
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(hf.Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(hf.Regex(CLIP_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  # Bytes back to text, then each end-of-word mark back to a space.
  tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace(END_OF_WORD, " "),
                                   decoders.Strip(" ", 0, 1)])
  return tok


def clip_bpe(vocab, merges, unk=None):
  """An HF tokenizer equal to transformers' CLIPTokenizer over `vocab` (token -> id) and
  `merges` ([(a, b)] in rank order)."""
  unk = unk or (CLIP_EOS if CLIP_EOS in vocab else UNK)
  tok = hf.Tokenizer(models.BPE(vocab, [tuple(m) for m in merges], continuing_subword_prefix="",
                                end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=unk))
  _clip_pipeline(tok)
  specials = [t for t in (PAD, BOS, EOS, UNK, CLIP_BOS, CLIP_EOS) if t in vocab]
  tok.add_special_tokens(specials)
  bos, eos = _find(tok, _BOS_NAMES), _find(tok, _EOS_NAMES)
  if bos and eos:  # For people who use the tokenizer.json directly: BOS/EOS framing.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos[0]} $A {eos[0]}", special_tokens=[bos, eos])
  return tok


def read_clip_files(vocab_path, merges_path):
  """CLIP's vocab.json + merges.txt -> (vocab dict, merges list)."""
  try:
    vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read CLIP tokenizer files '{vocab_path}', '{merges_path}' ({e}): "
                    "check the paths") from None
  # merges.txt: an optional '#version' header, then 'a b' per line (OpenAI's has no blanks).
  merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
  bad = [m for m in merges if len(m) != 2]
  if not isinstance(vocab, dict) or bad:
    raise UserError(f"'{vocab_path}' / '{merges_path}' are not CLIP vocab/merges files "
                    f"(e.g. merge line {bad[:1]}): use the files of a CLIP checkpoint")
  return vocab, merges


def write_clip_files(vocab, merges, out_dir):
  """Writes `vocab` (token -> id) and `merges` ('a b' or (a, b), in rank order) as CLIP's
  vocab.json + merges.txt into `out_dir`."""
  merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges),
                                      encoding="utf-8")


def save_clip_files(tok, out_dir):
  """Writes an HF BPE tokenizer's vocab.json + merges.txt (CLIP's layout) into `out_dir`."""
  spec = json.loads(tok.to_str())
  vocab = dict(spec["model"]["vocab"])
  for t in spec.get("added_tokens") or []:
    vocab.setdefault(t["content"], t["id"])
  write_clip_files(vocab, spec["model"]["merges"], out_dir)


def byte_alphabet():
  """GPT-2/CLIP's printable stand-in for each byte, in OpenAI's order (the printable bytes
  first, then the rest shifted past 255): the first 256 ids of OpenAI's vocabulary."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  rest = [b for b in range(256) if b not in printable]
  return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


OPENAI_MERGES = 49152 - 256 - 2  # merges OpenAI's vocabulary uses: 49408 ids in all


def read_openai_bpe(path):
  """OpenAI's `bpe_simple_vocab_16e6.txt.gz` (shipped by open_clip and OpenAI's CLIP) ->
  (vocab, merges) laid out as OpenAI's vocab.json / merges.txt: the 256 bytes, each byte
  ending a word, one token per merge, then <|startoftext|> 49406 and <|endoftext|> 49407.
  `write_clip_files` turns them into a folder `load_tokenizer` reads."""
  try:
    lines = gzip.open(path).read().decode("utf-8").split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read OpenAI's BPE merges '{path}' ({e}): pass open_clip's "
                    "bpe_simple_vocab_16e6.txt.gz") from None
  merges = [tuple(line.split()) for line in lines[1:OPENAI_MERGES + 1]]  # line 0: a header
  if len(merges) != OPENAI_MERGES or any(len(m) != 2 for m in merges):
    raise UserError(f"'{path}' does not hold OpenAI's {OPENAI_MERGES} BPE merges")
  chars = byte_alphabet()
  tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges]
  vocab = {t: i for i, t in enumerate(tokens + [CLIP_BOS, CLIP_EOS])}
  return vocab, merges


_BOS_NAMES = (BOS, CLIP_BOS, "<s>")
_EOS_NAMES = (EOS, CLIP_EOS, "</s>")
_PAD_NAMES = (PAD, "<pad>")
METASPACE = "\u2581"  # SentencePiece's visible space


def _find(tok, names):
  """(name, id) of the first of `names` in `tok`'s vocabulary, or None."""
  for name in names:
    i = tok.token_to_id(name)
    if i is not None:
      return name, i
  return None


def _component(part):
  """An HF tokenizer component (normalizer, post-processor) as its JSON data, {} if unset."""
  return json.loads(part.__getstate__()) if part is not None else {}


def _template_framing(tok):
  """(bos name or None, eos name) from a `[BOS] $A EOS` TemplateProcessing post-processor (what
  jaxret writes), else None."""
  post = _component(tok.post_processor)
  if post.get("type") != "TemplateProcessing":
    return None
  items = ["$A" if "Sequence" in x else x.get("SpecialToken", {}).get("id")
           for x in post.get("single") or []]
  if items.count("$A") != 1:
    return None
  at = items.index("$A")
  before, after = items[:at], items[at + 1:]
  if len(before) > 1 or len(after) != 1 or any(tok.token_to_id(n) is None for n in before + after):
    return None
  return (before[0] if before else None), after[0]


def set_framing(tok, bos_id, eos_id):
  """Gives HF tokenizer `tok` jaxret's framing, `BOS? text EOS`, as its post-processor, so
  tokenizing with padding='max_length' and truncation gives jaxret's rows."""
  names = [(tok.id_to_token(i), i) for i in (bos_id, eos_id) if i is not None]
  template = " ".join([names[0][0]] * (bos_id is not None) + ["$A", names[-1][0]])
  tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=names)
  return tok


class Tokenizer:
  """Fixed-length encoder over an HF tokenizer; see the module docstring for the layout."""

  def __init__(self, hf_tokenizer, max_len, path="<tokenizer>"):
    self._tok = hf_tokenizer
    self.path, self.max_len = str(path), int(max_len)
    framing = _template_framing(hf_tokenizer)
    if framing:
      bos, eos = ((n, hf_tokenizer.token_to_id(n)) if n else None for n in framing)
    else:
      bos, eos = _find(hf_tokenizer, _BOS_NAMES), _find(hf_tokenizer, _EOS_NAMES)
    if eos is None:
      raise UserError(f"tokenizer '{path}' has no end token: use a tokenizer.json whose "
                      f"post-processor frames texts `[BOS] $A EOS`, or one that defines {EOS} "
                      f"(the demo's does), CLIP's {CLIP_EOS} or </s>")
    pad = _find(hf_tokenizer, _PAD_NAMES) or eos
    self.pad_id, self.bos_id, self.eos_id = pad[1], bos and bos[1], eos[1]
    self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
    # Lower-cased in the cleanup too (as open_clip does) when the tokenizer lower-cases.
    self.lower = "Lowercase" in json.dumps(_component(hf_tokenizer.normalizer))

  def clean(self, text):
    """The text as this tokenizer sees it (see `clean_text`); give the exported HF tokenizer
    cleaned text to get jaxret's ids."""
    return clean_text(text, self.lower)

  def _frame(self, id_lists):
    return frame(id_lists, self.max_len, self.bos_id, self.eos_id, self.pad_id)

  def encode_batch(self, texts):
    """list of str -> int32 [len(texts), max_len]."""
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a list of strings; use encode() for one string")
    texts = [self.clean(t) for t in texts]
    return self._frame([e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)])

  def encode(self, text):
    """str -> int32 [max_len]."""
    # Single encode: no thread pool inside HF, so it is cheap per grain element.
    return self._frame([self._tok.encode(self.clean(text), add_special_tokens=False).ids])[0]

  def decode(self, ids):
    """ids (any int sequence) -> text, without BOS/EOS/PAD."""
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)

  def to_hf(self):
    """A copy of the HF tokenizer framing texts as `encode` does (what export writes)."""
    return set_framing(hf.Tokenizer.from_str(self._tok.to_str()), self.bos_id, self.eos_id)


def frame(id_lists, max_len, bos_id, eos_id, pad_id):
  """Token id lists -> int32 [n, max_len]: BOS (unless None) ids EOS PAD..., truncated."""
  out = np.full((len(id_lists), max_len), pad_id, np.int32)
  start = 0 if bos_id is None else 1
  keep = max_len - 1 - start
  for row, ids in zip(out, id_lists):
    ids = list(ids)[:keep]
    if start:
      row[0] = bos_id
    row[start:start + len(ids)] = ids
    row[start + len(ids)] = eos_id
  return out


class SentencePieceTokenizer:
  """Fixed-length encoder over a SentencePiece model (SigLIP-style text towers).

  Layout: [BOS] (only if the model defines one) pieces... EOS PAD...; PAD is the model's pad
  id, or EOS when it has none.
  """

  lower = False  # SentencePiece normalises by its own rules; case is kept.

  def __init__(self, path, max_len):
    import sentencepiece as spm
    self.path, self.max_len = str(path), int(max_len)
    try:
      self._sp = spm.SentencePieceProcessor(model_file=self.path)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with C++ text.
      raise UserError(f"'{path}' is not a SentencePiece model ({e}): use the tokenizer "
                      "the checkpoint was trained with") from None
    sp = self._sp
    self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
    if self.eos_id is None:
      raise UserError(f"SentencePiece model '{path}' has no end token (eos_id): train it "
                      "with one")
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
    self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id
    self.vocab_size = sp.get_piece_size()

  def clean(self, text):
    return clean_text(text)

  def encode_batch(self, texts):
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a list of strings; use encode() for one string")
    return frame(self._sp.encode([self.clean(t) for t in texts]), self.max_len, self.bos_id,
                 self.eos_id, self.pad_id)

  def encode(self, text):
    return self.encode_batch([text])[0]

  def decode(self, ids):
    specials = {self.bos_id, self.eos_id, self.pad_id}
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1) if i not in specials])

  def to_hf(self):
    """The model as an HF tokenizer with the same ids (unigram models: SigLIP's kind)."""
    return set_framing(sentencepiece_to_hf(self.path), self.bos_id, self.eos_id)


def sentencepiece_to_hf(path):
  """A unigram SentencePiece `.model` -> the HF tokenizer giving the same pieces: its pieces and
  scores, its normalisation table, whitespace as U+2581 with the leading one, its specials."""
  from sentencepiece import sentencepiece_model_pb2 as pb
  m = pb.ModelProto()
  m.ParseFromString(Path(path).read_bytes())
  t, n = m.trainer_spec, m.normalizer_spec
  if t.model_type != pb.TrainerSpec.UNIGRAM or t.treat_whitespace_as_suffix:
    kind = pb.TrainerSpec.ModelType.Name(t.model_type).lower()
    raise UserError(f"SentencePiece model '{path}' ({kind}"
                    f"{', whitespace as suffix' if t.treat_whitespace_as_suffix else ''}) cannot "
                    "be exported: export converts unigram models (SigLIP's kind); train one with "
                    "`jaxret data train-tokenizer --kind sentencepiece`")
  piece = pb.ModelProto.SentencePiece
  tok = hf.Tokenizer(models.Unigram([(p.piece, p.score) for p in m.pieces], t.unk_id,
                                    t.byte_fallback))
  steps = [normalizers.Precompiled(n.precompiled_charsmap)] if n.precompiled_charsmap else []
  if n.remove_extra_whitespaces:
    steps += [normalizers.Replace(hf.Regex(" {2,}"), " "), normalizers.Strip()]
  tok.normalizer = normalizers.Sequence(steps)
  tok.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement=METASPACE, prepend_scheme="always" if n.add_dummy_prefix else "never",
      split=t.split_by_whitespace)
  tok.decoder = decoders.Sequence(
      [decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
      + [decoders.Strip(" ", 1, 0)] * n.add_dummy_prefix)
  tok.add_special_tokens([p.piece for p in m.pieces if p.type == piece.CONTROL])
  tok.add_tokens([hf.AddedToken(p.piece, normalized=False, special=False)
                  for p in m.pieces if p.type == piece.USER_DEFINED])
  return tok


def _load_hf(path):
  """tokenizer.json, or CLIP vocab.json + merges.txt (folder or vocab.json path) -> HF."""
  if path.is_dir():
    if (path / "tokenizer.json").is_file():
      path = path / "tokenizer.json"
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
      return clip_bpe(*read_clip_files(path / "vocab.json", path / "merges.txt"))
    else:
      raise UserError(f"tokenizer folder '{path}' has neither tokenizer.json nor CLIP's "
                      "vocab.json + merges.txt")
  elif path.name.endswith("vocab.json"):
    merges = path.with_name(path.name.replace("vocab.json", "merges.txt"))
    return clip_bpe(*read_clip_files(path, merges))
  try:
    return hf.Tokenizer.from_file(str(path))
  except Exception as e:  # The HF error is a Rust parse message; name the file instead.
    raise UserError(f"tokenizer file '{path}' is not a valid HF tokenizer.json ({e}): "
                    "rebuild the data or replace the file") from None


def load_tokenizer(path, max_len):
  """Loads a tokenizer file (see the module docstring) producing `max_len` ids per text."""
  path = Path(path)
  if int(max_len) < 2:
    raise UserError(f"text length {max_len} is too short: it must be at least 2 "
                    "(room for BOS and EOS); raise the text length in the config")
  if path.suffix == ".model" and path.is_file():
    return SentencePieceTokenizer(path, max_len)
  if not path.exists():
    raise UserError(f"tokenizer file '{path}' not found: rebuild the data with "
                    "`jaxret data demo --out DIR`, or put there an HF tokenizer.json, a "
                    "SentencePiece .model or a folder with CLIP's vocab.json + merges.txt")
  return Tokenizer(_load_hf(path), max_len, path)

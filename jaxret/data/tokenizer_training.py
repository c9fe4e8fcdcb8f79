"""Training tokenizers on captions: the CLIP-style byte-level BPE (`jaxret data train-tokenizer`,
the converter and the demo build theirs with it) and SentencePiece models. Both consume their
corpus as a stream. What a trained tokenizer is, and reading one, is tokenizers.py's."""
import io
import itertools
import json
from pathlib import Path

import tokenizers as hf
from tokenizers import models, pre_tokenizers, trainers

from jaxret.data import sources
from jaxret.data.tokenizers import (SPECIAL_TOKENS, END_OF_WORD, UNK, clip_bpe, _clip_pipeline, clean_text, SentencePieceTokenizer, save_clip_files)
from jaxret.errors import UserError


def train_bpe(texts, path, *, vocab_size=49408, min_frequency=2, specials=SPECIAL_TOKENS,
              word_pattern=None):
  """Trains a CLIP-style byte-level BPE on `texts`; writes tokenizer.json to `path`.

  Ids: `specials` (0..), the 256 bytes, each byte ending a word (`x</w>`, so no text is
  ever unknown), then merges in rank order, up to `vocab_size` tokens in all. Trained
  by HF's trainer, which breaks ties between equally frequent pairs in hash order: the same
  texts give the same size but not always the same ids, so ship the file with the data
  (the demo's corpus is small enough that every word becomes one token either way).
  `word_pattern` replaces CLIP's word split (the demo keeps hyphenated words whole).
  """
  byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
  base = list(specials) + byte_chars + [c + END_OF_WORD for c in byte_chars]
  if vocab_size < len(base):
    raise UserError(f"vocab size {vocab_size} is smaller than the {len(base)} special and "
                    "byte tokens a byte-level BPE needs: ask for more")
  tok = hf.Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD,
                                unk_token=UNK if UNK in specials else None))
  _clip_pipeline(tok)
  if word_pattern:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(hf.Regex(word_pattern), behavior="removed", invert=True),
        # No GPT-2 split after ours: it would cut 't-shirt' at the hyphen.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency,
      special_tokens=list(specials), initial_alphabet=byte_chars, show_progress=False,
      end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="")
  # Trained on what encoding will see: cleaned texts (consumed as it goes: convert passes a
  # stream).
  tok.train_from_iterator((clean_text(t) for t in texts), trainer)
  merges = json.loads(tok.to_str())["model"]["merges"]
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
  vocab = {t: i for i, t in enumerate(base)}
  for a, b in merges:
    if len(vocab) >= vocab_size:
      break
    vocab.setdefault(a + b, len(vocab))
  merges = [(a, b) for a, b in merges if a + b in vocab and a in vocab and b in vocab]
  out = clip_bpe(vocab, merges, unk=UNK if UNK in specials else None)
  out.pre_tokenizer = tok.pre_tokenizer
  out.save(str(path))
  return out


def _caption_corpus(inputs):
  """Captions from text files (one per line) or data dirs (their train split's records)."""
  for item in inputs:
    item = Path(item)
    if item.is_dir():
      for raw in sources.open_split(item, "train"):
        try:
          yield from (c for c in sources.decode_record(raw)["captions"] if isinstance(c, str))
        except UserError:
          continue  # A broken record has no captions worth learning from.
    elif item.is_file():
      with open(item, encoding="utf-8", errors="replace") as f:
        yield from (line.rstrip("\n") for line in f if line.strip())
    else:
      raise UserError(f"caption corpus '{item}' not found: pass text files or data dirs")


# SentencePiece ids jaxret trains with: T5's and SigLIP's first three, then a start token. The end
# token is not 2, the id transformers' CLIP text model treats as OpenAI's legacy one.
SENTENCEPIECE_IDS = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=3)


def train_sentencepiece(texts, path, *, vocab_size=32000):
  """Trains a unigram SentencePiece model (SigLIP's kind) on the cleaned `texts`; writes the
  .model to `path`. Ids: SENTENCEPIECE_IDS, then the pieces; `vocab_size` is an upper bound (a
  small corpus gives fewer). Returns the number of pieces."""
  import sentencepiece as spm
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=(c for c in (clean_text(t) for t in texts) if c), model_writer=model,
        model_type="unigram", vocab_size=vocab_size, hard_vocab_limit=False,
        # A random sample bounds the trainer's memory on a big corpus.
        input_sentence_size=5_000_000, shuffle_input_sentence=True, minloglevel=2,
        **SENTENCEPIECE_IDS)
  except RuntimeError as e:  # C++ trainer messages (e.g. too few characters for the specials)
    raise UserError(f"SentencePiece training failed ({e}): give it more captions or a "
                    "smaller --vocab-size") from None
  Path(path).write_bytes(model.getvalue())
  return SentencePieceTokenizer(path, 2).vocab_size


def train_tokenizer_cli(inputs, out, *, kind="bpe", vocab_size=None, min_frequency=2,
                        clip_files=False):
  """`jaxret data train-tokenizer`: trains on the captions of `inputs`, writes `out`."""
  out = Path(out)
  if kind == "sentencepiece" and (out.suffix != ".model" or clip_files):
    raise UserError(f"--kind sentencepiece writes a .model file (--out '{out}'"
                    f"{' with --clip-files' if clip_files else ''}): pass --out NAME.model "
                    "without --clip-files")
  # Streamed: the trainers consume the corpus as it is read (a big one never sits in RAM).
  corpus = _caption_corpus(inputs)
  first = next(corpus, None)
  if first is None:
    raise UserError(f"no captions found in {', '.join(map(str, inputs))}")
  count = [0]

  def counted():
    for text in itertools.chain([first], corpus):
      count[0] += 1
      yield text
  texts = counted()
  out.parent.mkdir(parents=True, exist_ok=True)
  if kind == "sentencepiece":
    size = train_sentencepiece(texts, out, vocab_size=vocab_size or 32000)
  else:
    tok = train_bpe(texts, out, vocab_size=vocab_size or 49408, min_frequency=min_frequency)
    if clip_files:
      save_clip_files(tok, out.parent)
    size = tok.get_vocab_size()
  print(f"tokenizer: {size} tokens from {count[0]} captions -> '{out}'")

"""Tokenizers: CLIP BPE files give transformers.CLIPTokenizer's ids on cleaned text (jaxret cleans
captions as open_clip does before tokenizing; tests/test_tokenizer_kinds.py holds it to open_clip
itself); SentencePiece; training."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxret.data import tokenizer_training as TT
from jaxret.data import tokenizers as T

WORDS = ["a", "photo", "of", "the", "cat", "dog", "on", "red", "blue", "sofa", "car", "near",
         "beach", "sunset", "two", "people", "walking", "city", "street", "at", "night"]
ODD = ["Café au lait — très bon!", "日本語のキャプション、テスト。", "emoji 🐱🐶 and ✨ sparkles",
       "it's 2024 and we're FINE", "HTML &amp; <b>tags</b>", "tabs\tand\nnewlines   here ",
       "  leading and trailing  ", "", "!!!???...", "O'Neill's 3.14159 m²", "Ünïcödé ÀÉÎÕÜ ß ﬁ",
       "e\u0301 combining vs é", "mixedCASE WoRdS", "#hashtag @user https://x.io/a?b=c",
       "a-b-c hyphen_underscore", "ʻokina ʼapostrophe", "Ελληνικά кириллица עברית العربية"]


def captions(n, seed=0):
  """n varied captions: random words, odd unicode/punctuation, and texts far over 77 tokens."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    kind = i % 4
    if kind == 3:
      out.append(ODD[i // 4 % len(ODD)])
    else:
      k = rng.integers(1, 12 if kind < 2 else 120)  # kind 2: often longer than the context
      words = list(rng.choice(WORDS, size=k))
      if rng.random() < 0.3:
        words[rng.integers(k)] = str(rng.integers(10**6))
      text = " ".join(words)
      out.append(text.capitalize() + rng.choice(["", ".", "!", ", ok?"]))
  return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A tiny CLIP-format tokenizer (OpenAI's special names), trained here."""
  d = tmp_path_factory.mktemp("clip")
  tok = TT.train_bpe(captions(400, seed=1) + ODD, d / "tokenizer.json", vocab_size=900,
                    specials=(T.CLIP_BOS, T.CLIP_EOS))
  T.save_clip_files(tok, d)
  return d


def test_clip_files_match_transformers_clip_tokenizer(clip_dir):
  from transformers import CLIPTokenizer
  texts = captions(300, seed=2)
  ref = CLIPTokenizer.from_pretrained(str(clip_dir))
  cleaned = [T.clean_text(t, lower=True) for t in texts]
  assert cleaned != texts  # e.g. 'HTML &amp; <b>tags</b>', 'tabs\tand\nnewlines   here '
  want = np.array(ref(cleaned, padding="max_length", max_length=77, truncation=True)["input_ids"])
  eos = ref.eos_token_id
  assert ((want[:, -1] == eos) & (want[:, -2] != eos)).any(), "no caption was truncated"
  for path in (clip_dir, clip_dir / "vocab.json", clip_dir / "tokenizer.json"):
    tok = T.load_tokenizer(path, 77)
    got = tok.encode_batch(texts)
    np.testing.assert_array_equal(got, want, err_msg=str(path))
    np.testing.assert_array_equal(tok.encode(texts[5]), want[5])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id,
                                                    ref.pad_token_id)
    assert tok.vocab_size == len(ref)
  # Cleanup: case, whitespace runs and NFC do not change the ids.
  tok = T.load_tokenizer(clip_dir, 77)
  np.testing.assert_array_equal(tok.encode("  A   Photo\tof a CAT "), tok.encode("a photo of a cat"))
  np.testing.assert_array_equal(tok.encode("e\u0301"), tok.encode("\u00e9"))
  assert tok.decode(tok.encode("a photo of a cat.")) == "a photo of a cat ."


def test_clip_special_layout_and_full_size_vocab(tmp_path):
  """OpenAI's layout: 49408 ids with the specials last; every byte is known."""
  tok = TT.train_bpe(captions(200), tmp_path / "t.json", vocab_size=49408, min_frequency=1,
                    specials=())
  spec = json.loads(tok.to_str())
  vocab = dict(spec["model"]["vocab"])
  merges = spec["model"]["merges"]
  # Pad with filler merges to OpenAI's size, then add the specials as its files do.
  filler = [(f"q{i}", f"z{i}") for i in range(49406 - len(vocab))]
  for a, b in filler:
    vocab.setdefault(a, len(vocab))
  vocab = dict(list(vocab.items())[:49406])
  vocab[T.CLIP_BOS], vocab[T.CLIP_EOS] = 49406, 49407
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(
      (m if isinstance(m, str) else " ".join(m)) + "\n" for m in merges))
  mine = T.load_tokenizer(tmp_path, 77)
  assert (mine.vocab_size, mine.bos_id, mine.eos_id, mine.pad_id) == (49408, 49406, 49407, 49407)
  from transformers import CLIPTokenizer
  ref = CLIPTokenizer.from_pretrained(str(tmp_path))
  texts = captions(40, seed=3)
  np.testing.assert_array_equal(
      mine.encode_batch(texts),
      ref([mine.clean(t) for t in texts], padding="max_length", max_length=77,
          truncation=True)["input_ids"])
  assert T.clip_bpe(vocab, [tuple(m.split()) if isinstance(m, str) else m for m in merges]
                    ).encode("\x07 ☃", add_special_tokens=False).ids.count(49407) == 0  # no unknowns


def test_jaxret_names_kept_for_export(tmp_path):
  tok = TT.train_bpe(captions(100), tmp_path / "tokenizer.json", vocab_size=700)
  mine = T.load_tokenizer(tmp_path / "tokenizer.json", 16)
  assert (mine.pad_id, mine.bos_id, mine.eos_id) == (0, 1, 2)
  assert [tok.id_to_token(i) for i in range(4)] == list(T.SPECIAL_TOKENS)
  T.save_clip_files(tok, tmp_path / "clip")
  from transformers import CLIPTokenizer
  ref = CLIPTokenizer.from_pretrained(str(tmp_path / "clip"), bos_token=T.BOS, eos_token=T.EOS,
                                      pad_token=T.PAD, unk_token=T.UNK)
  texts = captions(60, seed=4)
  np.testing.assert_array_equal(
      mine.encode_batch(texts),
      ref([mine.clean(t) for t in texts], padding="max_length", max_length=16,
          truncation=True)["input_ids"])
  # Retrained on the same corpus: the same size (HF breaks ties between equally frequent
  # pairs in hash order, so ids may differ; see train_bpe).
  again = TT.train_bpe(captions(100), tmp_path / "again.json", vocab_size=700)
  assert again.get_vocab_size() == tok.get_vocab_size()


def test_sentencepiece_model(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(captions(300)) + "\n")
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=200, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, model_type="unigram", minloglevel=2, num_threads=1)
  tok = T.load_tokenizer(tmp_path / "sp.model", 16)
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, None, 200)
  ids = tok.encode_batch(["a photo of a cat", "two people walking " * 10])
  pieces = sp.encode("a photo of a cat")
  assert ids[0].tolist() == pieces + [1] + [0] * (16 - len(pieces) - 1)
  assert ids[1, -1] == 1 and (ids[1] != 0).all()  # truncated, EOS kept last
  assert tok.decode(ids[0]) == "a photo of a cat"


def test_train_tokenizer_cli(tmp_path):
  corpus = tmp_path / "captions.txt"
  corpus.write_text("\n".join(captions(200)) + "\n")
  out = tmp_path / "tok" / "tokenizer.json"
  r = subprocess.run([sys.executable, "-m", "jaxret.cli", "data", "train-tokenizer", str(corpus),
                      "--out", str(out), "--vocab-size", "800", "--clip-files"],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  assert "800 tokens" in r.stdout or "tokens from 200 captions" in r.stdout
  a, b = T.load_tokenizer(out, 77), T.load_tokenizer(out.parent, 77)
  texts = captions(50, seed=5)
  np.testing.assert_array_equal(a.encode_batch(texts), b.encode_batch(texts))
  r = subprocess.run([sys.executable, "-m", "jaxret.cli", "data", "train-tokenizer",
                      str(tmp_path / "nope.txt"), "--out", str(out)],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and "nope.txt" in r.stderr


def test_bad_tokenizer_files_name_the_file(tmp_path):
  from jaxret.errors import UserError
  (tmp_path / "vocab.json").write_text("{}")
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
  with pytest.raises(UserError, match="merges.txt"):
    T.load_tokenizer(tmp_path, 77)
  (tmp_path / "x.model").write_text("not a model")
  with pytest.raises(UserError, match="x.model"):
    T.load_tokenizer(tmp_path / "x.model", 77)

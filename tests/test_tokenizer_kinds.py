"""Every tokenizer kind end to end: OpenAI's CLIP BPE (vocab.json + merges.txt built from the merges
file open_clip ships), SentencePiece .model files, a trained BPE tokenizer.json.

References: open_clip's own tokenizer (loaded from its source file) on raw web captions; the
sentencepiece library; transformers' AutoTokenizer / CLIPTokenizer over the exported folder; the
FILIP reference loss with a mask built by hand. Nothing downloads.
"""
import importlib.util
import os
import types

import jax
import numpy as np
import pytest

from jaxret import cli, config
from jaxret.data import tokenizer_training as TT
from jaxret.data import tokenizers as T
from jaxret.data import transforms
from jaxret.errors import UserError
from jaxret.export import processor
from jaxret.losses import filip_reference, get_loss
from jaxret.models.two_tower import build_model
from jaxret.parallel.mesh import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Raw web captions: HTML entities (escaped once and twice), mojibake, accents, emoji (flags, ZWJ
# sequences), CJK, upper-case Greek (final sigma), odd whitespace, long texts.
WEB = [
    "Caf\u00c3\u00a9 au lait &amp; croissants",
    "Tom&#39;s dog &quot;Rex&quot; at the park",
    "fish &amp;amp; chips",
    "na\u00efve r\u00e9sum\u00e9 \u00e0 la carte \u00c9COLE Stra\u00dfe",
    "\U0001F431 cat with \u2728 sparkles \U0001F1EF\U0001F1F5 \U0001F468\u200d\U0001F469\u200d\U0001F467",
    "\u6771\u4eac\u30bf\u30ef\u30fc\u306e\u591c\u666f and \u5317\u4eac",
    "\u039f\u0394\u039f\u03a3 \u03a3\u039f\u03a6\u0399\u0391\u03a3",
    "  lots\tof\n\nwhitespace\u00a0here \u3000 ",
    "<b>Bold</b> &lt;b&gt;tag&lt;/b&gt; &nbsp;nbsp",
    "I\u2019m here \u2014 it's 3.14159 m\u00b2, \ufb01ne!!!",
    "\u0130stanbul DISTRICT e\u0301 vs \u00e9",
    "A photo of a cat. " * 20,  # longer than the context
    "supercalifragilisticexpialidocious " * 9,
]
WORDS = ["a", "photo", "of", "the", "cat", "dog", "on", "red", "blue", "sofa", "beach", "sunset",
         "two", "people", "walking", "city", "street", "at", "night", "caf\u00e9"]


def corpus(n, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))).capitalize() + "."
          for _ in range(n)] + WEB


def first_eos_mask(ids, eos_id):
  """The naive mask: each row's positions up to and including its first end token."""
  mask = np.zeros(ids.shape, bool)
  for row, out in zip(ids, mask):
    out[:list(row).index(eos_id) + 1] = True
  return mask


# ---------------------------------------------------------------------------- the files


def load_open_clip():
  """open_clip's tokenizer module, loaded from its file without the package __init__ (which
  imports torchvision, not installable for this torch), and the OpenAI merges it ships."""
  spec = importlib.util.find_spec("open_clip")
  assert spec is not None, ("open-clip-torch is missing: `make test` installs it with "
                            "`pip install --no-deps -c constraints.txt open-clip-torch`")
  root = spec.submodule_search_locations[0]
  module_spec = importlib.util.spec_from_file_location(
      "open_clip_tokenizer", os.path.join(root, "tokenizer.py"))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, os.path.join(root, "bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def open_clip():
  return load_open_clip()


@pytest.fixture(scope="module")
def files(open_clip, tmp_path_factory):
  """{kind: path}: OpenAI's CLIP BPE folder, a SentencePiece model trained by jaxret (a pad
  piece), one with sentencepiece's default ids (no pad piece: pads with its end token, id 2), one
  with SigLIP's ids (no start token), a BPE SentencePiece model (not exportable) and a trained BPE
  tokenizer.json."""
  import sentencepiece as spm
  d = tmp_path_factory.mktemp("tokenizers")
  T.write_clip_files(*T.read_openai_bpe(open_clip[1]), d / "openai")
  texts = corpus(300)
  TT.train_sentencepiece(texts, d / "sp.model", vocab_size=200)
  siglip = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  for name, kind, ids in (("sp_nopad", "unigram", {}), ("sp_bpe", "bpe", {}),
                          ("sp_siglip", "unigram", siglip)):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([T.clean_text(t) for t in texts]), model_prefix=str(d / name),
        vocab_size=150, model_type=kind, minloglevel=2, num_threads=1, hard_vocab_limit=False,
        **ids)
  TT.train_bpe(texts, d / "tokenizer.json", vocab_size=600)
  return {"openai": d / "openai", "sentencepiece": d / "sp.model",
          "sentencepiece-no-pad": d / "sp_nopad.model", "sentencepiece-bpe": d / "sp_bpe.model",
          "sentencepiece-no-bos": d / "sp_siglip.model",
          "bpe-json": d / "tokenizer.json"}


EXPORTABLE = ["openai", "sentencepiece", "sentencepiece-no-pad", "sentencepiece-no-bos",
              "bpe-json"]


def test_openai_files_from_open_clip_merges(open_clip, files):
  module, gz = open_clip
  vocab, merges = T.read_openai_bpe(gz)
  ref = module.SimpleTokenizer(gz)
  # open_clip builds the same table; only its special tokens are spelled differently.
  names = {"<start_of_text>": T.CLIP_BOS, "<end_of_text>": T.CLIP_EOS}
  assert vocab == {names.get(t, t): i for t, i in ref.encoder.items()}
  assert len(vocab) == 49408 and (vocab[T.CLIP_BOS], vocab[T.CLIP_EOS]) == (49406, 49407)
  tok = T.load_tokenizer(files["openai"], 77)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49408, 49406, 49407, 49407)


@pytest.mark.parametrize("context", [77, 16])
def test_openai_bpe_gives_open_clips_ids_on_raw_web_captions(open_clip, files, context):
  module, gz = open_clip
  ref = module.SimpleTokenizer(gz, context_length=context)
  texts = WEB + corpus(60, seed=1)[:60]
  want = ref(texts).numpy()
  got = T.load_tokenizer(files["openai"], context).encode_batch(texts)
  eot = ref.eot_token_id
  # open_clip truncates to the context and puts its end token last; jaxret keeps the same tokens.
  truncated = (want[:, -1] == eot) & ((want == eot).sum(1) == 1) & (want[:, -2] != 0)
  assert truncated.sum() >= 2
  # open_clip pads with 0, jaxret with <|endoftext|> (as transformers does); the rest is equal.
  mask = first_eos_mask(want, eot)
  np.testing.assert_array_equal(np.where(mask, got, 0), want)
  assert (got[~mask] == eot).all()


def test_clean_text_is_open_clips(open_clip):
  module, _ = open_clip
  for text in WEB:
    assert T.clean_text(text) == module._clean_whitespace(text)
    assert T.clean_text(text, lower=True) == module._clean_lower(text)
  # Captions that clean to nothing are not used.
  assert transforms.clean_captions(["&nbsp;", " ok ", "\u00a0 "]) == ["ok"]


def test_clean_text_ascii_shortcut_is_open_clips(open_clip):
  # clean_text skips ftfy for printable ASCII without '&': open_clip's cleanup (ftfy, entities
  # twice, whitespace) must give the same on such text, punctuation and quotes included, and on
  # its neighbours that take the full path (tabs, controls, entities, non-ASCII).
  module, _ = open_clip
  rng = np.random.default_rng(0)
  alphabet = [chr(c) for c in range(32, 127)] + [" "] * 20
  texts = ["".join(rng.choice(alphabet, rng.integers(0, 40))) for _ in range(2000)]
  texts += ["a\tb\r\nc", "x\x1b[31mred", "&amp;lt;b&amp;gt;", "caf\u00e9 \u201cq\u201d",
            "\u00c3\u00a9t\u00c3\u00a9", "  two  spaces  ", "'quoted' \"and\" `ticked`"]
  for text in texts:
    assert T.clean_text(text) == module._clean_whitespace(text), repr(text)
    assert T.clean_text(text, lower=True) == module._clean_lower(text), repr(text)


# ---------------------------------------------------------------------------- one interface


@pytest.mark.parametrize("kind", EXPORTABLE)
def test_every_kind_frames_the_same_way(files, kind):
  tok = T.load_tokenizer(files[kind], 12)
  texts = ["a photo of a cat.", "two people walking at night " * 4, "&amp;"]
  ids = tok.encode_batch(texts)
  assert ids.dtype == np.int32 and ids.shape == (3, 12)
  np.testing.assert_array_equal(tok.encode(texts[0]), ids[0])
  start = 0 if tok.bos_id is None else 1
  if start:
    assert (ids[:, 0] == tok.bos_id).all()
  for row in ids:
    end = list(row).index(tok.eos_id)
    assert end >= start + 1  # every caption here has a token
    assert (row[end + 1:] == tok.pad_id).all()
  assert ids[1, -1] == tok.eos_id  # truncated: the end token stays last
  assert tok.decode(ids[0]).replace(" .", ".") == "a photo of a cat."
  assert tok.vocab_size > int(ids.max())


def test_sentencepiece_ids_are_sentencepieces(files):
  import sentencepiece as spm
  for kind in ("sentencepiece", "sentencepiece-no-pad", "sentencepiece-no-bos"):
    tok = T.load_tokenizer(files[kind], 40)
    sp = spm.SentencePieceProcessor(model_file=str(files[kind]))
    texts = corpus(30, seed=2)
    for text, row in zip(texts, tok.encode_batch(texts)):
      pieces = sp.encode(T.clean_text(text))[:40 - 1 - (tok.bos_id is not None)]
      want = [tok.bos_id] * (tok.bos_id is not None) + pieces + [tok.eos_id]
      assert row.tolist() == want + [tok.pad_id] * (40 - len(want))
  no_pad = T.load_tokenizer(files["sentencepiece-no-pad"], 8)
  assert no_pad.pad_id == no_pad.eos_id == 2 and no_pad.bos_id == 1
  no_bos = T.load_tokenizer(files["sentencepiece-no-bos"], 8)
  assert (no_bos.pad_id, no_bos.eos_id, no_bos.bos_id) == (0, 1, None)


def test_train_sentencepiece_cli_round_trips(tmp_path, capsys):
  data = tmp_path / "captions.txt"
  data.write_text("\n".join(corpus(200, seed=3)) + "\n")
  out = tmp_path / "tok" / "sp.model"
  cli.main(["data", "train-tokenizer", str(data), "--kind", "sentencepiece", "--out", str(out),
            "--vocab-size", "300"])
  assert f"-> '{out}'" in capsys.readouterr().out
  tok = T.load_tokenizer(out, 32)
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 3)
  assert 30 < tok.vocab_size <= 300
  for text in ["A photo of the cat on the sofa.", "Two people walking, caf\u00e9 at night!"]:
    assert tok.decode(tok.encode(text)) == text
  with pytest.raises(SystemExit) as e:
    cli.main(["data", "train-tokenizer", str(data), "--kind", "sentencepiece", "--out",
              str(tmp_path / "tokenizer.json")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and ".model" in err


# ---------------------------------------------------------------------------- export

IMAGE = types.SimpleNamespace(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("target", ["clip", "siglip"])
@pytest.mark.parametrize("kind", EXPORTABLE)
def test_exported_tokenizer_gives_jaxrets_ids(files, kind, target, tmp_path):
  import transformers
  length = 16
  out = tmp_path / "hf"
  perm, ids = processor.write_processor(str(out), target, files[kind], IMAGE, length)
  tok = T.load_tokenizer(files[kind], length)
  texts = WEB + corpus(40, seed=4)
  want = np.argsort(perm)[tok.encode_batch(texts)]  # the exported ids (CLIP may swap two)
  hf = transformers.AutoTokenizer.from_pretrained(out)
  cleaned = [tok.clean(t) for t in texts]
  got = hf(cleaned, padding="max_length", max_length=length, truncation=True)["input_ids"]
  np.testing.assert_array_equal(got, want)
  assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (ids["pad"], ids["eos"],
                                                                 ids["bos"])
  if target == "clip":
    assert ids["eos"] != processor.LEGACY_CLIP_EOS
  if kind == "openai":  # CLIP's own files too: transformers' CLIPTokenizer reads the same ids
    ref = transformers.CLIPTokenizer.from_pretrained(out)
    np.testing.assert_array_equal(
        ref(cleaned, padding="max_length", max_length=length, truncation=True)["input_ids"], want)
  # `jaxret.load` of an exported folder reads its tokenizer.json: the same ids again.
  np.testing.assert_array_equal(T.load_tokenizer(out / "tokenizer.json", length)
                                .encode_batch(texts), want)


def test_a_tokenizer_export_cannot_convert_is_one_line(files, tmp_path):
  with pytest.raises(UserError, match="sp_bpe.model") as e:
    processor.write_processor(str(tmp_path / "hf"), "siglip", files["sentencepiece-bpe"], IMAGE,
                              16)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------- FILIP's text mask

FILIP_MODEL = ["model.embed_dim=16", "model.image.size=32", "model.image.patch_size=16",
               "model.image.width=16", "model.image.depth=1", "model.image.num_heads=2",
               "model.image.mlp_dim=32", "model.text.max_len=12", "model.text.width=16",
               "model.text.depth=1", "model.text.num_heads=2", "model.text.mlp_dim=32"]


@pytest.mark.parametrize("kind", ["openai", "sentencepiece-no-pad"])
def test_filip_text_mask_keeps_the_end_token_when_it_pads(files, kind):
  cfg = config.load(os.path.join(ROOT, "configs", "demo.py") + ":filip", FILIP_MODEL)
  tok = T.load_tokenizer(files[kind], cfg.model.text.max_len)
  assert tok.pad_id == tok.eos_id
  text = tok.encode_batch(corpus(8, seed=5)[:7] + [WEB[-1]])  # one row truncated
  model = build_model(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id)
  images = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3)) * 255
  params = jax.jit(model.init)(jax.random.key(0), images, text)
  out = jax.jit(lambda p, i, t: model.apply(p, i, t, tokens=True))(params, images, text)
  naive = first_eos_mask(text, tok.eos_id)
  np.testing.assert_array_equal(out["text_mask"], naive)

  loss = get_loss("filip", {**cfg.loss, "filip_token_fraction": 1.0})
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  got = jax.jit(lambda o: loss.fn(o, mesh=mesh, options=loss.options))(out)
  want = filip_reference(out["image_tokens"], out["image_mask"], out["text_tokens"], naive,
                         out["scale"])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The mask matters: dropping every pad id (the end token with it) gives another loss.
  dropped = filip_reference(out["image_tokens"], out["image_mask"], out["text_tokens"],
                            text != tok.pad_id, out["scale"])
  assert abs(float(dropped) - float(want)) > 1e-4


# ---------------------------------------------------------------------------- train, eval, export


def data_with(tokenizer, demo_dir, out):
  """A copy of the demo data whose manifest names `tokenizer` (copied in as `jaxret data convert
  --tokenizer` does: 'tokenizer' for a folder, 'tokenizer.model' for a SentencePiece file)."""
  import json
  import shutil
  shutil.copytree(demo_dir, out)
  name = "tokenizer" + tokenizer.suffix
  (shutil.copytree if tokenizer.is_dir() else shutil.copyfile)(tokenizer, out / name)
  manifest = json.loads((out / "manifest.json").read_text())
  (out / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": name}))
  return out


def test_filip_train_eval_export_with_openais_bpe(files, demo_dir, tiny_config, tmp_path):
  """A FILIP run on data tokenized by OpenAI's CLIP BPE folder (padding = end token), evaluated
  and exported as CLIPModel: transformers' text features from the exported tokenizer on cleaned
  captions equal the run's own on raw ones."""
  import torch
  import transformers

  import jaxret
  from jaxret.export.hf import export_workdir
  from jaxret.train.loop import train
  data = data_with(files["openai"], demo_dir, tmp_path / "data")
  cfg = tiny_config("filip", f"data.dir={data}", "total_steps=1", "optim.warmup_steps=0",
                    "checkpoint.every=1", "eval.tasks=('retrieval',)")
  workdir = str(tmp_path / "run")
  result = train(cfg, workdir, progress=False)
  assert result["similarity"] == "late_interaction" and result["num_pairs"] == 64
  assert all(0 <= result[d][k] <= 1 for d in ("i2t", "t2i") for k in ("R@1", "R@5", "R@10"))
  out = str(tmp_path / "hf")
  assert export_workdir(workdir, out) == "clip"

  texts = ["A photo of a red zero &amp; a blue one", "Caf\u00c3\u00a9 au lait", "ONE " * 30]
  mine = jaxret.load(workdir, batch_size=8)
  want = np.asarray(mine.encode_texts(texts))
  tok = transformers.AutoTokenizer.from_pretrained(out)
  ids = tok([mine.tokenizer.clean(t) for t in texts], padding="max_length",
            max_length=cfg.model.text.max_len, truncation=True, return_tensors="pt")
  pt = transformers.CLIPModel.from_pretrained(out).eval()
  with torch.no_grad():
    got = pt.get_text_features(**ids)
  got = getattr(got, "pooler_output", got).numpy()
  np.testing.assert_allclose(got / np.linalg.norm(got, axis=-1, keepdims=True), want, atol=1e-4)


def test_sentencepiece_data_feeds_training(files, demo_dir, tiny_config, tmp_path):
  """A data set with a SentencePiece model without a pad piece: the run's vocabulary comes from
  it (a pinned size that differs is refused), and training batches are its framed ids."""
  from jaxret.data.pipeline import train_iterator
  from jaxret.experiment import Experiment
  data = data_with(files["sentencepiece-no-pad"], demo_dir, tmp_path / "data")
  exp = Experiment(tiny_config("sigmoid", f"data.dir={data}"))
  tok = T.load_tokenizer(data / "tokenizer.model", exp.cfg.model.text.max_len)
  assert exp.model.text.vocab_size == tok.vocab_size == 150
  assert (exp.model.pad_id, exp.model.text.eos_id) == (tok.pad_id, tok.eos_id) == (2, 2)
  with pytest.raises(UserError, match="model.text.vocab_size is 32000"):
    Experiment(tiny_config("sigmoid", f"data.dir={data}", "model.text.vocab_size=32000"))
  batch = next(iter(train_iterator(str(data), batch_size=8, text_len=tok.max_len, seed=0)))
  text = batch["text"]
  assert (text[:, 0] == tok.bos_id).all()
  ends = first_eos_mask(text, tok.eos_id).sum(1)
  assert (ends >= 3).all() and (text[first_eos_mask(text, tok.eos_id) == 0] == tok.pad_id).all()
  words = [tok.decode(row).split() for row in text]  # the demo's captions: 'a red six above...'
  assert all(w[0] in ("a", "an") and len(w) >= 3 for w in words), words

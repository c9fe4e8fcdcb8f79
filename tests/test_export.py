"""Export to transformers (CLIPModel / SiglipModel) and import back.

Parity: a randomly initialised tiny jaxret model is exported, loaded in PyTorch, and fed the
same raw inputs through each side's own preprocessing (uint8 PNG records through jaxret's eval
transform vs the exported image processor; captions through jaxret's tokenizer vs the exported
one); embeddings and logits agree within 1e-4 in fp32. Import gives back the same bits.
"""
import io
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxret import cli, config  # noqa: E402
from jaxret.data import tokenizers, transforms  # noqa: E402
from jaxret.errors import UserError  # noqa: E402
from jaxret.workdir import load_imported  # noqa: E402
from jaxret.export import hf  # noqa: E402
from jaxret.losses import filip_scores  # noqa: E402
from jaxret.models.two_tower import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
SIZE, LEN = 32, 12
# Text narrower than the image (and different head sizes) so a swapped axis cannot hide.
SMALL = ["model.embed_dim=32", "model.image.size=32", "model.image.patch_size=8",
         "model.image.width=32", "model.image.depth=2", "model.image.num_heads=4",
         "model.image.mlp_dim=64", "model.text.max_len=12", "model.text.width=24",
         "model.text.depth=2", "model.text.num_heads=2", "model.text.mlp_dim=48"]
CAPTIONS = ["a red zero", "two blue shirts and a green bag on the left of a red zero",
            "the green bag", "a red shirt left of two blue bags"]

VARIANTS = {
    # CLIP: cls pooling, ln_pre, causal text pooled at the first end token.
    "clip": ("softmax", []),
    # ... with OpenAI's pixel statistics, which the exported processor must carry.
    "clip-quick_gelu-eps1e-6": ("softmax", [
        "model.act=quick_gelu", "model.ln_eps=1e-6",
        "model.image.mean=(0.48145466, 0.4578275, 0.40821073)",
        "model.image.std=(0.26862954, 0.26130258, 0.27577711)"]),
    # SigLIP: MAP head, no ln_pre, no image projection, bidirectional text pooled last.
    "siglip": ("siglip", []),
    "siglip-gelu-eps1e-6-no-biases": ("siglip", [
        "model.act=gelu", "model.ln_eps=1e-6", "model.image.patch_bias=false",
        "model.text_proj_bias=false"]),
    # Scanned layers (stacked [depth] params) export through the same per-block table.
    "clip-scanned": ("softmax", ["model.scan=true"]),
    "siglip-scanned-remat": ("siglip", ["model.scan=true", "model.remat=full"]),
}


def _cfg(loss, overrides=()):
  return config.load(os.path.join(ROOT, "configs", "demo.py") + ":" + loss,
                     SMALL + list(overrides))


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tokenizers.build_word_level(CAPTIONS, path)
  return str(path)


def _random_model(cfg, tok_path, seed=0):
  tok = tokenizers.load_tokenizer(tok_path, cfg.model.text.max_len)
  model = build_model(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)),
                               jnp.zeros((1, LEN), jnp.int32)))["params"]
  # Init leaves LayerNorms and biases at 1 and 0; move every leaf so none of them hides a bug.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return model, jax.tree.unflatten(tree, leaves), tok


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _jax_images(images):
  """jaxret's own eval path: a PNG record through DecodeRecord (uint8; the model normalises)."""
  decode = transforms.DecodeRecord()
  out = []
  for im in images:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    raw = msgpack.packb({"image": buf.getvalue(), "captions": ["x"]})
    out.append(decode.map(raw)["image"])
  return jnp.asarray(np.stack(out))


def _torch_inputs(out, images):
  processor = transformers.AutoProcessor.from_pretrained(out)
  # SigLIP's text tower is trained on max_len-padded text; CLIP's is causal (padding-blind).
  return processor(text=CAPTIONS, images=[Image.fromarray(im) for im in images],
                   padding="max_length", max_length=LEN, truncation=True, return_tensors="pt")


def _assert_close(name, got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  err = float(np.abs(got - want).max())
  assert err < TOL, f"{name}: max abs error {err:.2e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_transformers(variant, tok_path, tmp_path):
  loss, overrides = VARIANTS[variant]
  cfg = _cfg(loss, overrides)
  model, params, tok = _random_model(cfg, tok_path)
  out = str(tmp_path / "hf")
  target = hf.export_params(cfg.model, params, tok_path, out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json",
                                     "tokenizer.json", "tokenizer_config.json"]
  cls = transformers.CLIPModel if target == "clip" else transformers.SiglipModel
  assert target == ("clip" if loss == "softmax" else "siglip")
  pt = cls.from_pretrained(out).eval()

  images = _images(len(CAPTIONS))
  want = model.apply({"params": params}, _jax_images(images),
                     jnp.asarray(tok.encode_batch(CAPTIONS)))
  with torch.no_grad():
    got = pt(**_torch_inputs(out, images))
  _assert_close("image_embeds", got.image_embeds, want["image_emb"])
  _assert_close("text_embeds", got.text_embeds, want["text_emb"])
  logits = want["scale"] * want["image_emb"] @ want["text_emb"].T + want.get("bias", 0.0)
  _assert_close("logits_per_image", got.logits_per_image, logits)


def test_clip_end_token_is_not_legacy_id_2(tok_path, tmp_path):
  """transformers pools CLIP text at argmax(input_ids) when eos_token_id == 2 (the demo's)."""
  assert tokenizers.load_tokenizer(tok_path, LEN).eos_id == 2
  cfg = _cfg("softmax")
  _, params, _ = _random_model(cfg, tok_path)
  out = str(tmp_path / "hf")
  hf.export_params(cfg.model, params, tok_path, out)
  loaded = transformers.CLIPConfig.from_pretrained(out)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert loaded.text_config.eos_token_id != 2
  assert loaded.text_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("[EOS]")
  ids = tok(CAPTIONS[0])["input_ids"]
  assert ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id


def _filip_torch(model, inputs):
  """The README's recipe: FILIP scores from an exported CLIPModel."""
  import torch.nn.functional as F
  vision = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
  image_tokens = F.normalize(model.visual_projection(model.vision_model.post_layernorm(vision)),
                             dim=-1)
  text = model.text_model(input_ids=inputs["input_ids"],
                          attention_mask=inputs["attention_mask"]).last_hidden_state
  text_tokens = F.normalize(model.text_projection(text), dim=-1)
  mask = inputs["attention_mask"].bool()  # padding takes part in neither max nor mean
  sim = torch.einsum("ikd,jrd->ijkr", image_tokens, text_tokens)
  s_image = sim.masked_fill(~mask[None, :, None, :], float("-inf")).amax(-1).mean(-1)
  s_text = (sim.amax(-2) * mask[None]).sum(-1) / mask.sum(-1)[None]
  return s_image, s_text


def test_filip_scores_in_pytorch(tok_path, tmp_path):
  cfg = _cfg("filip")
  model, params, tok = _random_model(cfg, tok_path)
  out = str(tmp_path / "hf")
  hf.export_params(cfg.model, params, tok_path, out)
  images = _images(3, seed=1)
  want = model.apply({"params": params}, _jax_images(images),
                     jnp.asarray(tok.encode_batch(CAPTIONS)), tokens=True)
  s_image, s_text = filip_scores(want["image_tokens"], want["image_mask"], want["text_tokens"],
                                 want["text_mask"])
  pt = transformers.CLIPModel.from_pretrained(out).eval()
  with torch.no_grad():
    got_image, got_text = _filip_torch(pt, _torch_inputs(out, images))
  _assert_close("filip s^I", got_image, s_image)
  _assert_close("filip s^T", got_text, s_text)


@pytest.mark.parametrize("loss", ["softmax", "siglip"])
def test_round_trip_is_bit_exact(loss, tok_path, tmp_path):
  cfg = _cfg(loss)
  _, params, _ = _random_model(cfg, tok_path, seed=3)
  out, ckpt = str(tmp_path / "hf"), str(tmp_path / "imported")
  hf.export_params(cfg.model, params, tok_path, out)
  cli.main(["import-hf", out, "--out", ckpt, "--tokenizer", tok_path])
  back = load_imported(ckpt)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # model.json rebuilds the same model.
  with open(os.path.join(ckpt, "model.json")) as f:
    rebuilt = config.merge({"model": json.load(f)}).model
  for key in ("act", "ln_eps", "embed_dim", "image_proj", "text_proj_bias", "init_bias"):
    assert rebuilt[key] == cfg.model[key], key
  for tower in ("image", "text"):
    for key, value in cfg.model[tower].items():
      if key != "vocab_size":
        assert rebuilt[tower][key] == value, (tower, key)


def test_refuses_what_the_target_cannot_express(tok_path, tmp_path):
  out = str(tmp_path / "hf")
  cfg = _cfg("softmax", ["model.image.pool=gap", "model.image.pre_norm=false",
                         "model.image.patch_bias=true"])
  with pytest.raises(UserError) as e:
    hf.export_params(cfg.model, {}, tok_path, out)
  msg = str(e.value)
  assert "CLIPModel" in msg and "\n" not in msg
  for key in ("model.image.pool='gap'", "model.image.pre_norm", "model.image.patch_bias"):
    assert key in msg
  cfg = _cfg("siglip", ["model.image.pre_norm=true", "model.text.causal=true"])
  with pytest.raises(UserError, match="SiglipModel.*model.image.pre_norm.*model.text.causal"):
    hf.export_params(cfg.model, {}, tok_path, out)
  assert not os.path.exists(out)


# ------------------------------------------------------------- from a training run


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
  """A tiny CLIP trained 2 steps with parameters sharded over fsdp=2 (of 8 CPU devices)."""
  from jaxret.train.loop import train
  cfg = tiny_config("softmax", "total_steps=2", "optim.warmup_steps=1", "checkpoint.every=1",
                    "checkpoint.keep=2", "mesh.fsdp=2")
  workdir = str(tmp_path_factory.mktemp("run"))
  train(cfg, workdir, progress=False)
  return cfg, workdir


def test_export_of_a_trained_checkpoint(trained, tmp_path, capsys):
  cfg, workdir = trained
  out = str(tmp_path / "hf")
  cli.main(["export", "--workdir", workdir, "--step", "1", "--format", "hf", "--out", out])
  assert "CLIPModel.from_pretrained" in capsys.readouterr().out
  _, params, step, tok_path = hf.restore_on_cpu(workdir, 1)
  assert step == 1
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(params))
  tok = tokenizers.load_tokenizer(tok_path, cfg.model.text.max_len)
  model = build_model(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id)
  size = cfg.model.image.size
  images = np.random.default_rng(2).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  captions = ["a red zero", "a blue one"]
  want = model.apply({"params": params}, jnp.asarray(images, jnp.float32) / 127.5 - 1.0,
                     jnp.asarray(tok.encode_batch(captions)))
  pt = transformers.CLIPModel.from_pretrained(out).eval()
  processor = transformers.AutoProcessor.from_pretrained(out)
  inputs = processor(text=captions, images=[Image.fromarray(im) for im in images],
                     padding=True, return_tensors="pt")
  with torch.no_grad():
    got = pt(**inputs)
  _assert_close("image_embeds", got.image_embeds, want["image_emb"])
  _assert_close("text_embeds", got.text_embeds, want["text_emb"])
  # The latest step is the default.
  cli.main(["export", "--workdir", workdir, "--out", out, "--overwrite"])
  assert "step 2" in capsys.readouterr().out


def _fails(argv, capsys, *words):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jaxret: error:") and "\n" not in err, err
  for w in words:
    assert w in err, (w, err)


def test_bad_requests_write_nothing(trained, tmp_path, capsys):
  _, workdir = trained
  out = str(tmp_path / "hf")
  empty = tmp_path / "fresh"
  empty.mkdir()
  _fails(["export", "--workdir", str(empty), "--out", out], capsys, "no config.json")
  (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  _fails(["export", "--workdir", str(empty), "--out", out], capsys, "no checkpoints")
  assert sorted(os.listdir(empty)) == ["config.json"]
  _fails(["export", "--workdir", workdir, "--step", "7", "--out", out], capsys,
         "no checkpoint at step 7", "available: 1, 2")
  assert not os.path.exists(out)
  os.makedirs(out)
  (tmp_path / "hf" / "keep.txt").write_text("mine")
  _fails(["export", "--workdir", workdir, "--out", out], capsys, "not empty", "--overwrite")
  assert os.listdir(out) == ["keep.txt"]
  _fails(["import-hf", workdir, "--out", str(tmp_path / "imp")], capsys, "no transformers model")
  _fails(["import-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "imp")], capsys,
         "no config.json")
  assert not os.path.exists(tmp_path / "imp")


@pytest.mark.parametrize("scan", [False, True])
def test_init_from_an_imported_model_starts_training_from_its_weights(trained, tiny_config,
                                                                      tmp_path, scan):
  """trained run -> export -> import-hf (back to the run's tokenizer) -> a new run with
  model.init_from starts from exactly the trained weights (stacked when the new run scans)."""
  from jaxret.experiment import Experiment
  from jaxret.models.two_tower import scanned
  from jaxret.train.loop import train
  from jaxret.workdir import load_initial_params
  cfg, workdir = trained
  _, params, _, tok_path = hf.restore_on_cpu(workdir)
  out, ckpt = str(tmp_path / "hf"), str(tmp_path / "imported")
  cli.main(["export", "--workdir", workdir, "--out", out])
  cli.main(["import-hf", out, "--out", ckpt, "--tokenizer", tok_path])

  overrides = ["total_steps=1", "optim.warmup_steps=0", "checkpoint.every=0",
               f"model.init_from={ckpt}", f"model.scan={str(scan).lower()}"]
  exp = Experiment(tiny_config("softmax", *overrides))
  start = load_initial_params(ckpt, exp.abstract_state.params, exp.state_sh.params, scan)
  want = scanned(jax.device_get(params)) if scan else jax.device_get(params)
  assert jax.tree.structure(start) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And the wiring: a run with init_from trains from there.
  assert train(tiny_config("softmax", *overrides), str(tmp_path / "run"), progress=False)
  if not scan:  # The import carries the processor's pixel statistics; others are refused.
    with open(os.path.join(ckpt, "model.json")) as f:
      assert json.load(f)["image"]["mean"] == list(cfg.model.image.mean)
    other = tiny_config("softmax", *overrides, "model.image.mean=(0.48, 0.46, 0.41)")
    with pytest.raises(UserError, match=r"model.image.mean=\(0.5, 0.5, 0.5\)"):
      train(other, str(tmp_path / "run2"), progress=False)


def test_init_from_a_wrong_folder_is_one_line(tiny_config, tmp_path):
  from jaxret.train.loop import train
  with pytest.raises(UserError, match="not a folder written by `jaxret import-hf`"):
    train(tiny_config("softmax", f"model.init_from={tmp_path}"), str(tmp_path / "w"),
          progress=False)

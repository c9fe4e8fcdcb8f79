"""Hard negatives (NegCLIP-style extra captions) in the three losses: the references against
plain-Python loops, and every kernel (all_gather, ring by swaps and by ppermute) against the
references, value and gradient, on 1 and 8 simulated devices."""

import math
import os

import jax
import numpy as np
import pytest

from jaxret import losses

import test_losses as base  # shared data makers, meshes and tolerances

K = 2  # negatives per example


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _negatives(batch=base.B, seed=5):
  rng = np.random.default_rng(seed)
  return base._unit(rng.normal(size=(batch, K, base.D)))


def _token_negatives(batch=base.B, seed=6):
  rng = np.random.default_rng(seed)
  tokens = base._unit(rng.normal(size=(batch, K, base.NT, base.D)))
  lengths = rng.integers(1, base.NT + 1, size=(batch, K))
  mask = np.arange(base.NT)[None, None] < lengths[..., None]
  tokens[~mask] = 3.0 * rng.normal(size=(int((~mask).sum()), base.D))  # padding must not leak
  return tokens, mask


# ----------------------------------------------------------------------------------------
# References against loops (float64): negatives are extra image->text columns, never positive.


def _log_sum_exp(values):
  top = max(values)
  return top + math.log(sum(math.exp(v - top) for v in values))


def _np_softmax_negatives(x, y, negs, s):
  n = len(x)
  columns = list(y) + [v for example in negs for v in example]
  i2t = sum(_log_sum_exp([s * float(np.dot(x[i], c)) for c in columns]) - s * float(np.dot(x[i], y[i]))
            for i in range(n)) / n
  t2i = sum(_log_sum_exp([s * float(np.dot(x[j], y[i])) for j in range(n)]) - s * float(np.dot(x[i], y[i]))
            for i in range(n)) / n
  return (i2t + t2i) / 2


def _np_sigmoid_negatives(x, y, negs, s, b):
  total = base._np_sigmoid(x, y, s, b) * len(x)
  for i in range(len(x)):
    for example in negs:
      for v in example:
        total += math.log1p(math.exp(s * float(np.dot(x[i], v)) + b))  # -log sigmoid(-z)
  return total / len(x)


def _np_filip_negatives(images, texts, negs, s):
  s_i, s_t = base._np_filip_scores(images, texts)
  neg_i, _ = base._np_filip_scores(images, [v for example in negs for v in example])
  n = len(images)
  i2t = sum(_log_sum_exp([s * v for v in s_i[i]] + [s * v for v in neg_i[i]]) - s * s_i[i][i]
            for i in range(n)) / n
  t2i = sum(_log_sum_exp([s * s_t[i][j] for i in range(n)]) - s * s_t[j][j] for j in range(n)) / n
  return (i2t + t2i) / 2


def test_softmax_reference_with_negatives_matches_loop():
  x, y = base._pooled(6)
  negs = _negatives(6)
  got = losses.softmax_reference(x, y, base.SCALE, negatives=negs)
  base._close(got, _np_softmax_negatives(x.astype(np.float64), y.astype(np.float64), negs, base.SCALE))
  assert float(got) > float(losses.softmax_reference(x, y, base.SCALE))  # the columns count


def test_sigmoid_reference_with_negatives_matches_loop():
  x, y = base._pooled(6)
  negs = _negatives(6)
  got = losses.sigmoid_reference(x, y, base.SCALE, base.BIAS, negatives=negs)
  base._close(got, _np_sigmoid_negatives(x.astype(np.float64), y.astype(np.float64), negs,
                                         base.SCALE, base.BIAS))


def test_filip_reference_with_negatives_matches_loop():
  it, im, tt, tm = base._tokens(6)
  nt, nm = _token_negatives(6)
  got = losses.filip_reference(it, im, tt, tm, base.SCALE, neg_tokens=nt, neg_mask=nm)
  want = _np_filip_negatives(base._valid(it, im), base._valid(tt, tm),
                             [base._valid(t, m) for t, m in zip(nt, nm)], base.SCALE)
  base._close(got, want)


# ----------------------------------------------------------------------------------------
# Kernels against the references.

MESHES = {"1dev": (1, 1, 1), "data4xfsdp2": (4, 2, 1)}
# One device has no moves, so its ring is one form; eight devices try both move kinds.
FORMS = [("1dev", "all_gather", "auto"), ("1dev", "ring", "auto")] + [
    ("data4xfsdp2", impl, moves)
    for impl, moves in (("all_gather", "auto"), ("ring", "swaps"), ("ring", "ppermute"))]


def _problem(name):
  if name == "filip":
    it, im, tt, tm = base._tokens()
    nt, nm = _token_negatives()
    return (it, im, tt, tm, np.float32(base.SCALE), nt, nm), (0, 2, 4, 5)
  x, y = base._pooled()
  rest = (np.float32(base.SCALE),) + ((np.float32(base.BIAS),) if name == "sigmoid" else ())
  return (x, y, *rest, _negatives()), (0, 1, 2, len(rest) + 2)


def _reference(name):
  if name == "filip":
    return lambda it, im, tt, tm, s, nt, nm: losses.filip_reference(it, im, tt, tm, s, nt, nm)
  ref = {"softmax": losses.softmax_reference, "sigmoid": losses.sigmoid_reference}[name]
  return lambda *a: ref(*a[:-1], negatives=a[-1])


def _kernel(name, mesh, impl, moves):
  axes = ("data", "fsdp")
  if name == "filip":
    return lambda it, im, tt, tm, s, nt, nm: losses.filip_loss(
        it, im, tt, tm, s, mesh=mesh, axes=axes, impl=impl, moves=moves, chunk=3,
        negatives=(nt, nm))
  fn = {"softmax": losses.softmax_loss, "sigmoid": losses.sigmoid_loss}[name]
  return lambda *a: fn(*a[:-1], mesh=mesh, axes=axes, impl=impl, moves=moves, negatives=a[-1])


@pytest.mark.parametrize("mesh_name,impl,moves", FORMS)
@pytest.mark.parametrize("name", ["softmax", "sigmoid", "filip"])
def test_kernels_with_negatives_match_the_reference(name, mesh_name, impl, moves):
  args, argnums = _problem(name)
  want = jax.value_and_grad(_reference(name), argnums=argnums)(*args)
  kernel = _kernel(name, base._mesh(MESHES[mesh_name]), impl, moves)
  got = jax.jit(jax.value_and_grad(kernel, argnums=argnums))(*args)
  base._close(got[0], want[0])
  for g, w in zip(got[1], want[1]):
    base._close(g, w)
  assert np.abs(np.asarray(got[1][-1])).max() > 1e-4  # the negatives do get a gradient


def test_negatives_of_another_batch_size_are_refused():
  x, y = base._pooled()
  mesh = base._mesh((1, 1, 1))
  with pytest.raises(Exception, match="batch size"):
    losses.softmax_loss(x, y, base.SCALE, mesh=mesh, negatives=_negatives(base.B - 2))


# ----------------------------------------------------------------------------------------
# The model encodes negatives with the text tower, and the train step's loss takes them; the
# exact GradCache form keeps them exact.


def _batch_with_negatives(exp, k=2, seed=0):
  from jaxret.data.pipeline import train_iterator
  from jaxret.parallel import partitioning
  cfg = exp.cfg
  it = train_iterator(cfg.data.dir, batch_size=cfg.batch_size, text_len=cfg.model.text.max_len,
                      seed=seed)
  batch = dict(next(it))
  rng = np.random.default_rng(seed)
  # Negatives: other rows' captions, shuffled within the row (any token ids do for the check).
  batch["neg_text"] = np.stack([rng.permutation(batch["text"])[:, :] for _ in range(k)], axis=1)
  sh = partitioning.batch_sharding(exp.mesh)
  return {key: jax.device_put(v, sh) for key, v in batch.items()}


@pytest.mark.parametrize("loss", ["softmax", "sigmoid", "filip"])
def test_train_step_loss_with_negatives_is_the_reference_on_the_towers_outputs(tiny_config, loss):
  from jaxret.experiment import Experiment, init_state
  from jaxret.parallel import partitioning
  from jaxret.train.step import loss_and_grads
  exp = Experiment(tiny_config(loss, "data.hard_negatives=2"))
  params = init_state(exp.model, exp.tx, exp.mesh, 64, 0, exp.state_sh).params
  batch = _batch_with_negatives(exp)
  with partitioning.activate(exp.mesh):
    value, out, _ = jax.jit(lambda p, b: loss_and_grads(exp.model, exp.loss, p, b,
                                                        mesh=exp.mesh))(params, batch)
    # The negatives' embeddings are the text tower's, one caption at a time.
    flat = np.asarray(batch["neg_text"]).reshape(-1, batch["neg_text"].shape[-1])
    alone = jax.jit(lambda p, t: exp.model.apply({"params": p}, t, tokens=True,
                                                 method=exp.model.encode_text))(params, flat)
  k = batch["neg_text"].shape[1]
  base._close(np.asarray(out["neg_text_emb"]).reshape(-1, out["neg_text_emb"].shape[-1]),
              alone["text_emb"])
  o = {key: np.asarray(v) for key, v in out.items()}
  if loss == "filip":
    want = losses.filip_reference(o["image_tokens"], o["image_mask"], o["text_tokens"],
                                  o["text_mask"], o["scale"], o["neg_text_tokens"],
                                  o["neg_text_mask"])
  elif loss == "softmax":
    want = losses.softmax_reference(o["image_emb"], o["text_emb"], o["scale"],
                                    negatives=o["neg_text_emb"])
  else:
    want = losses.sigmoid_reference(o["image_emb"], o["text_emb"], o["scale"], o["bias"],
                                    negatives=o["neg_text_emb"])
  assert o["neg_text_emb"].shape[:2] == (exp.cfg.batch_size, k)
  base._close(value, want, rtol=1e-5, atol=1e-5)


def test_grad_cache_with_negatives_equals_the_one_batch_gradient(tiny_config):
  from jaxret.experiment import Experiment, init_state
  from jaxret.parallel import partitioning
  from jaxret.train.step import loss_and_grads
  exp = Experiment(tiny_config("softmax", "data.hard_negatives=2"))
  params = init_state(exp.model, exp.tx, exp.mesh, 64, 0, exp.state_sh).params
  batch = _batch_with_negatives(exp)

  def run(steps):
    fn = jax.jit(lambda p, b: loss_and_grads(exp.model, exp.loss, p, b, mesh=exp.mesh,
                                             accum_steps=steps))
    with partitioning.activate(exp.mesh):
      value, _, grads = fn(params, batch)
    return float(value), grads

  (want_value, want), (value, got) = run(1), run(2)
  assert abs(value - want_value) < 1e-5
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("value", [-1, True])
def test_bad_hard_negatives_count_is_one_line(value):
  from jaxret import config
  from jaxret.errors import UserError
  with pytest.raises(UserError, match="config key 'data.hard_negatives' expects int, got 1.5"):
    config.merge({"data": {"hard_negatives": 1.5}})  # the schema's type check comes first
  cfg = config.merge({"data": {"hard_negatives": value}})
  with pytest.raises(UserError, match=r"^data.hard_negatives must be a whole number >= 0") as err:
    config.validate(cfg)
  assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------
# The pipeline: k swapped captions per example, tokenized beside the caption.


def _scenes_of_captions(classes):
  from jaxret.data import demo
  out = {}
  for scene in demo._all_scenes(classes):
    for c in demo.captions_for(scene):
      out.setdefault(c, set()).add(demo.combination_key(scene))
  return out


def test_negatives_are_captions_of_other_scenes_never_of_the_record_own(demo_dir):
  from jaxret.data import demo, sources, transforms
  manifest = sources.load_manifest(demo_dir)
  scenes_of = _scenes_of_captions(manifest["classes"])
  records = sources.open_split(demo_dir, "train")
  make = transforms.HardNegatives(3, manifest["classes"])
  rng = np.random.default_rng(0)
  for i in range(20):
    record = sources.decode_record(records[i])
    own = demo.combination_key(record["meta"]["items"])
    for caption in record["captions"]:
      out = make.random_map({"caption": caption, "meta": record["meta"]}, rng)
      assert "meta" not in out and len(out["neg_captions"]) == 3
      for negative in out["neg_captions"]:
        assert negative in scenes_of and own not in scenes_of[negative], (caption, negative)


def test_pipeline_gives_k_tokenized_negatives_per_example(demo_dir):
  from jaxret.data import sources
  from jaxret.data.pipeline import train_iterator
  from jaxret.data.tokenizers import load_tokenizer
  manifest = sources.load_manifest(demo_dir)
  tok = load_tokenizer(os.path.join(demo_dir, manifest["tokenizer"]), 20)
  scenes_of = _scenes_of_captions(manifest["classes"])
  batch = next(train_iterator(demo_dir, batch_size=8, text_len=20, seed=0, hard_negatives=3))
  assert batch["neg_text"].shape == (8, 3, 20) and batch["neg_text"].dtype == np.int32
  for text, negs in zip(batch["text"], batch["neg_text"]):
    caption = tok.decode(text)
    for n in negs:
      assert tok.decode(n) in scenes_of and tok.decode(n) != caption


def test_a_caption_with_no_swap_gets_its_words_reordered():
  from jaxret.data import transforms
  out = transforms.HardNegatives(2).random_map({"caption": "just words here"},
                                                np.random.default_rng(0))
  for negative in out["neg_captions"]:
    assert negative != "just words here" and sorted(negative.split()) == ["here", "just", "words"]


def test_hard_negatives_on_captions_without_swappable_words_stop_at_start(tmp_path):
  import os
  import subprocess
  import sys
  from PIL import Image
  folder = tmp_path / "imgs"
  folder.mkdir()
  lines = []
  for i in range(40):
    Image.fromarray(np.full((32, 32, 3), i * 5, np.uint8)).save(folder / f"{i}.png")
    word = "".join(chr(97 + (i // 26 ** j) % 26) for j in range(2))  # no digit: a count swaps
    lines.append(f'{{"image": "{i}.png", "caption": "just plain words {word}"}}')
  (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
  data = tmp_path / "data"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def jaxret(*args):
    return subprocess.run([sys.executable, "-m", "jaxret.cli", *args], cwd=root,
                          capture_output=True, text=True, timeout=600)

  made = jaxret("data", "convert", "--images", str(folder), "--captions",
                str(tmp_path / "captions.jsonl"), "--out", str(data), "--split", "train",
                "--image-size", "32", "--vocab-size", "600")
  assert made.returncode == 0, made.stderr[-2000:]
  run = jaxret("train", "--config", "configs/demo.py:softmax", "--workdir", str(tmp_path / "run"),
               f"--config.data.dir={data}", "--config.data.eval_split=train",
               "--config.batch_size=16", "--config.total_steps=2", "--config.optim.warmup_steps=1",
               "--config.data.hard_negatives=2")
  assert run.returncode == 2, run.stderr[-2000:]
  last = [line for line in run.stderr.splitlines() if line.strip()][-1]
  assert "data.hard_negatives=2: none of the first 40 captions" in last, last
  assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing saved


def test_k_negatives_take_the_swap_types_in_turn(demo_dir):
  from jaxret.data import caption_swaps, demo, sources, transforms
  manifest = sources.load_manifest(demo_dir)
  record = sources.decode_record(sources.open_split(demo_dir, "train")[0])
  by_type = caption_swaps.demo_swaps(record["meta"]["items"], classes=manifest["classes"])
  type_of = {c: t for t, group in by_type.items() for c in group}
  out = transforms.HardNegatives(3, manifest["classes"]).random_map(
      {"caption": demo.captions_for(record["meta"]["items"])[0], "meta": record["meta"]},
      np.random.default_rng(1))
  assert sorted(type_of[c] for c in out["neg_captions"]) == ["attribute", "object", "relation"]


def test_demo_negatives_are_phrased_like_their_positive():
  from jaxret.data import caption_swaps, demo
  items = [["sneaker", "red", "top left"], ["bag", "blue", "bottom right"]]
  captions = demo.captions_for(items)
  for j, caption in enumerate(captions):
    variants = caption_swaps.demo_swaps_like(items, caption)
    flat = [c for group in variants.values() for c in group]
    # Relational phrasings merge moves that keep the relation ("above" twice): 3 distinct.
    assert len(variants["relation"]) == (5 if j < 2 else 3)
    for c in flat:
      assert (" in the " in c) == (j < 2), (caption, c)  # the cell template or the relational
    if j == 1:  # "a blue bag in the bottom right and a red sneaker in the top left"
      assert "a blue bag in the top left and a red sneaker in the bottom right" in variants["relation"]
    if j == 2:  # "a red sneaker above and to the left of a blue bag"
      assert "a red sneaker below and to the right of a blue bag" in variants["relation"]
  assert caption_swaps.demo_swaps_like(items, "not one of its captions") is None

"""Similarity distillation (loss.distill): the reference against plain-Python loops, the
sharded kernel against the reference (value and gradient) on 1 and 8 simulated devices, and
the teacher in the train step."""

import math
import os

import jax
import numpy as np
import pytest

from jaxret.errors import UserError
from jaxret.losses import distill

import test_losses as base

TAU = 0.2


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _embeddings(batch=base.B, seed=0):
  rng = np.random.default_rng(seed)
  si, st = base._pooled(batch, seed)
  ti = base._unit(si + 0.5 * rng.normal(size=si.shape))  # a teacher that roughly agrees
  tt = base._unit(st + 0.5 * rng.normal(size=st.shape))
  return si, st, ti, tt


def _np_softmax(values):
  top = max(values)
  e = [math.exp(v - top) for v in values]
  return [x / sum(e) for x in e]


def _np_distill(si, st, ti, tt, tau, hard):
  n = len(si)
  s = [[float(np.dot(si[i], st[j])) / tau for j in range(n)] for i in range(n)]
  t = [[float(np.dot(ti[i], tt[j])) / tau for j in range(n)] for i in range(n)]
  total = 0.0
  for logits_s, logits_t in ((s, t), ([list(c) for c in zip(*s)], [list(c) for c in zip(*t)])):
    kls, hardness = [], []
    for i in range(n):
      ps, pt = _np_softmax(logits_s[i]), _np_softmax(logits_t[i])
      kls.append(sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt)))
      hardness.append(1 - pt[i])
    weights = [n * h / sum(hardness) for h in hardness] if hard else [1.0] * n
    total += sum(w * k for w, k in zip(weights, kls))
  return total / (2 * n)


@pytest.mark.parametrize("hard", [False, True])
def test_reference_matches_loop(hard):
  args = _embeddings(6)
  got = distill.distill_reference(*args, TAU, hard)
  base._close(got, _np_distill(*[a.astype(np.float64) for a in args], TAU, hard))


def test_reference_is_zero_when_the_student_is_the_teacher():
  si, st, _, _ = _embeddings(6)
  base._close(distill.distill_reference(si, st, si, st, TAU, True), 0.0, atol=1e-6)


def test_hard_weighting_weighs_what_the_teacher_finds_hard():
  # Example 0's teacher positive is as good as a negative (hard); the others are easy. Weighted,
  # the student's error on example 0 costs more than unweighted.
  si, st, ti, tt = _embeddings(6)
  tt = tt.copy()
  tt[0] = tt[1]
  plain, weighted = (float(distill.distill_reference(si, st, ti, tt, TAU, h)) for h in (False, True))
  assert weighted != pytest.approx(plain)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1), (8, 1, 1), (4, 2, 1)])
def test_kernel_matches_reference(shape, hard):
  args = _embeddings()
  want = jax.value_and_grad(distill.distill_reference, argnums=(0, 1))(*args, TAU, hard)
  mesh = base._mesh(shape)
  fn = lambda si, st, ti, tt: distill.distill_loss(si, st, ti, tt, mesh=mesh, temperature=TAU,
                                                   hard_weighting=hard)
  got = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*args)
  base._close(got[0], want[0])
  for g, w in zip(got[1][:2], want[1]):
    base._close(g, w)
  for g in got[1][2:]:  # the teacher gets no gradient
    assert not np.any(np.asarray(g))


# ----------------------------------------------------------------------------------------
# A teacher in the train step (online) and in the records (offline).


@pytest.fixture(scope="module")
def teacher_dir(tiny_config, tmp_path_factory):
  """A teacher: the tiny CLIP trained 2 steps at 32 px (the students train at 64: the step
  resizes their crops for it)."""
  from jaxret.train.loop import train
  workdir = str(tmp_path_factory.mktemp("teacher"))
  train(tiny_config("softmax", "model.image.size=32", "total_steps=2", "optim.warmup_steps=1",
                    "checkpoint.every=0", "eval.tasks=('retrieval',)"), workdir, progress=False)
  return workdir


def _first_batch(exp, **kwargs):
  from jaxret.data.pipeline import train_iterator
  from jaxret.parallel import partitioning
  cfg = exp.cfg
  it = train_iterator(cfg.data.dir, batch_size=cfg.batch_size, text_len=cfg.model.text.max_len,
                      seed=0, **kwargs)
  sh = partitioning.batch_sharding(exp.mesh)
  return {k: jax.device_put(v, sh) for k, v in next(it).items()}


def _student(tiny_config, teacher, *overrides):
  from jaxret.experiment import Experiment, init_state
  exp = Experiment(tiny_config("softmax", f"loss.distill.teacher={teacher}",
                               "loss.distill.temperature=0.2", "loss.distill.weight=0.5",
                               *overrides))
  return exp, init_state(exp.model, exp.tx, exp.mesh, 64, 0, exp.state_sh).params


def _value(exp, params, batch, distill, teacher=None, accum=1):
  from jaxret.parallel import partitioning
  from jaxret.train.step import loss_and_grads
  with partitioning.activate(exp.mesh):
    fn = jax.jit(lambda p, b, tp: loss_and_grads(exp.model, exp.loss, p, b, mesh=exp.mesh,
                                                 accum_steps=accum, distill=distill,
                                                 teacher=teacher, teacher_params=tp))
    value, out, grads = fn(params, batch, teacher.params if teacher else {})
  return float(value), out, grads


@pytest.mark.parametrize("hard", [False, True])
def test_online_step_adds_the_weighted_reference_term(tiny_config, teacher_dir, hard):
  import jaxret
  from jaxret.train.loop import distillation
  exp, params = _student(tiny_config, teacher_dir, f"loss.distill.hard_weighting={hard}")
  distill, teacher = distillation(exp, exp.cfg)
  assert not teacher.own_tokens and teacher.image_size == 32  # same tokenizer, smaller images
  batch = _first_batch(exp)
  value, out, _ = _value(exp, params, batch, distill, teacher)
  plain, _, _ = _value(exp, params, batch, None)
  # The teacher's embeddings, independently: its own model on the crops resized to 32 px.
  model = jaxret.load(teacher_dir)
  small = np.asarray(jax.image.resize(np.asarray(batch["image"], np.float32), (16, 32, 32, 3),
                                      "bilinear"))
  ti = model.embed_arrays("image", np.clip(np.round(small), 0, 255).astype(np.uint8))
  tt = model.embed_arrays("text", np.asarray(batch["text"]))
  want = distill_ref(out, ti, tt, hard)
  base._close(float(out["distill"]), want, rtol=1e-4, atol=1e-5)
  base._close(value, plain + 0.5 * want, rtol=1e-4, atol=1e-5)


def distill_ref(out, ti, tt, hard):
  return float(distill.distill_reference(np.asarray(out["image_emb"]), np.asarray(out["text_emb"]),
                                         ti, tt, 0.2, hard))


def test_grad_cache_with_distillation_equals_the_one_batch_gradient(tiny_config, teacher_dir):
  from jaxret.train.loop import distillation
  exp, params = _student(tiny_config, teacher_dir)
  distill_opts, teacher = distillation(exp, exp.cfg)
  batch = _first_batch(exp)
  v1, _, g1 = _value(exp, params, batch, distill_opts, teacher)
  v2, _, g2 = _value(exp, params, batch, distill_opts, teacher, accum=2)
  assert abs(v1 - v2) < 1e-5
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_offline_records_hold_the_teachers_embeddings_of_each_view(teacher_dir, demo_dir,
                                                                    tmp_path):
  import jaxret
  from jaxret.data import sources, teacher_store, transforms
  from jaxret.inference import teacher_data
  out = teacher_data.write_teacher_data(teacher_dir, demo_dir, tmp_path / "taught", views=2,
                                         progress=False, batch_size=32)
  manifest = sources.load_manifest(out)
  assert manifest["teacher"]["views"] == 2 and manifest["teacher"]["image_size"] == 64
  model = jaxret.load(teacher_dir)
  raw = sources.open_split(out, "train")[5]
  record = sources.decode_record(raw)
  image, captions, _ = transforms.DecodeRecord().decode(raw)
  views, image_emb, text_emb = teacher_store.stored(record)
  assert views.shape == (2, 5) and image_emb.shape == (2, model.embed_dim)
  crops = np.stack([teacher_store.apply_view(image, v, 64) for v in views])
  small = np.asarray(jax.image.resize(crops.astype(np.float32), (2, 32, 32, 3), "bilinear"))
  want = model.embed_arrays("image", np.clip(np.round(small), 0, 255).astype(np.uint8))
  np.testing.assert_allclose(image_emb, want, atol=1e-5)
  np.testing.assert_allclose(text_emb, model.encode_texts(captions), atol=1e-5)
  # The test split is copied as it was.
  assert sources.file_sha256(sources.split_files(out, "test")[0]) == \
      sources.file_sha256(sources.split_files(demo_dir, "test")[0])


def test_online_and_offline_give_the_same_loss_for_the_same_views(tiny_config, teacher_dir,
                                                                 demo_dir, tmp_path):
  from jaxret.inference import teacher_data
  from jaxret.train.loop import distillation
  taught = teacher_data.write_teacher_data(teacher_dir, demo_dir, tmp_path / "taught", views=3,
                                            progress=False, batch_size=64)
  exp, params = _student(tiny_config, teacher_dir, f"data.dir={taught}",
                         "loss.distill.source=offline")
  offline, none = distillation(exp, exp.cfg)
  assert none is None
  batch = _first_batch(exp, teacher_views=True)  # stored views, with their embeddings
  value_offline, _, _ = _value(exp, params, batch, offline)
  exp_on, _ = _student(tiny_config, teacher_dir, f"data.dir={taught}")
  online, teacher = distillation(exp_on, exp_on.cfg)
  same_views = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
  value_online, _, _ = _value(exp, params, same_views, online, teacher)
  assert value_offline == pytest.approx(value_online, rel=1e-5, abs=1e-6)


def _cli(*args):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, "-m", "jaxret.cli", *args], cwd=root,
                        capture_output=True, text=True, timeout=600)


def test_training_with_a_teacher_logs_the_term_and_a_bad_teacher_stops_at_start(
    demo_dir, teacher_dir, tmp_path):
  from jaxret.workdir import read_metrics
  common = ["train", "--config", "configs/demo.py:softmax", f"--config.data.dir={demo_dir}",
            *[f"--config.{o}" for o in ("model.embed_dim=32", "model.image.width=32",
                                        "model.image.depth=1", "model.image.num_heads=2",
                                        "model.image.mlp_dim=64", "model.text.width=32",
                                        "model.text.depth=1", "model.text.num_heads=2",
                                        "model.text.mlp_dim=64", "batch_size=16",
                                        "total_steps=2", "log_every=1", "optim.warmup_steps=1",
                                        "checkpoint.every=0", "eval.tasks=('retrieval',)",
                                        "eval.batch_size=32")]]
  run = _cli(*common, "--workdir", str(tmp_path / "run"), f"--config.loss.distill.teacher={teacher_dir}")
  assert run.returncode == 0, run.stderr[-3000:]
  logged = [r for r in read_metrics(str(tmp_path / "run")) if "distill" in r]
  assert logged and all(r["distill"] > 0 for r in logged)
  bad = _cli(*common, "--workdir", str(tmp_path / "bad"),
             f"--config.loss.distill.teacher={tmp_path / 'nothing'}")
  assert bad.returncode == 2
  last = [line for line in bad.stderr.splitlines() if line.strip()][-1]
  assert last.startswith(f"jaxret: error: loss.distill.teacher '{tmp_path / 'nothing'}' cannot "
                         "be loaded: model")
  assert not (tmp_path / "bad").exists()


def test_teacher_tokens_follow_the_teachers_own_tokenizer(demo_dir, tmp_path):
  from jaxret.data.pipeline import train_iterator
  from jaxret.data.tokenizer_training import train_bpe
  from jaxret.data.tokenizers import load_tokenizer
  other = tmp_path / "other.json"
  train_bpe([f"a {c} thing number {i}" for i in range(50) for c in ("red", "blue")], other,
            vocab_size=600)
  batch = next(train_iterator(demo_dir, batch_size=8, text_len=20, seed=0,
                              teacher_tokens=(str(other), 12)))
  student = load_tokenizer(os.path.join(demo_dir, "tokenizer.json"), 20)
  teacher = load_tokenizer(str(other), 12)
  assert batch["teacher_text"].shape == (8, 12)
  for text, theirs in zip(batch["text"], batch["teacher_text"]):
    np.testing.assert_array_equal(theirs, teacher.encode(student.decode(text)))


def test_the_teacher_is_sharded_like_the_student(tiny_config, teacher_dir):
  from jaxret.experiment import Experiment
  from jaxret.inference.teacher import load_teacher
  exp = Experiment(tiny_config("softmax", "mesh.data=4", "mesh.fsdp=2"))
  teacher = load_teacher(teacher_dir, exp.mesh, exp.rules, exp.tokenizer_path,
                         exp.cfg.model.text.max_len)
  student = exp.state_sh.params
  kernel = lambda tree: tree["text"]["encoder"]["block00"]["mlp"]["fc1"]["kernel"]  # noqa: E731
  assert kernel(teacher.params).sharding.spec == kernel(student).spec
  assert "fsdp" in str(kernel(student).spec)  # the FSDP axis is really in use
  assert kernel(teacher.params).sharding.mesh.shape == exp.mesh.shape


def test_a_teacher_with_its_own_tokenizer_reads_its_own_tokens(tiny_config, demo_dir, tmp_path):
  """The teacher's data had another tokenizer: the step feeds it "teacher_text", and the term
  is the reference on the teacher's embeddings of the same captions."""
  import shutil
  import jaxret
  from jaxret.data import sources
  from jaxret.data.tokenizer_training import train_bpe
  from jaxret.data.tokenizers import load_tokenizer
  from jaxret.train.loop import distillation, train
  other = tmp_path / "other_data"
  shutil.copytree(demo_dir, other)
  manifest = sources.load_manifest(other)
  records = sources.open_split(demo_dir, "train")
  captions = [c for i in range(64) for c in sources.decode_record(records[i])["captions"]]
  train_bpe(captions, other / manifest["tokenizer"], vocab_size=700)  # another vocabulary
  teacher = str(tmp_path / "teacher")
  train(tiny_config("softmax", f"data.dir={other}", "total_steps=1", "optim.warmup_steps=0",
                    "checkpoint.every=0", "eval.tasks=('retrieval',)"), teacher, progress=False)
  exp, params = _student(tiny_config, teacher)
  options, t = distillation(exp, exp.cfg)
  assert t.own_tokens
  batch = _first_batch(exp, teacher_tokens=(t.tokenizer_path, t.text_len))
  _, out, _ = _value(exp, params, batch, options, t)
  student_tok = load_tokenizer(os.path.join(demo_dir, "tokenizer.json"), exp.cfg.model.text.max_len)
  texts = [student_tok.decode(row) for row in np.asarray(batch["text"])]
  model = jaxret.load(teacher)
  np.testing.assert_array_equal(np.asarray(batch["teacher_text"]),
                                model.tokenizer.encode_batch(texts))
  ti = model.embed_arrays("image", np.asarray(batch["image"]))  # same size: no resize
  tt = model.encode_texts(texts)
  base._close(float(out["distill"]), distill_ref(out, ti, tt, False), rtol=1e-4, atol=1e-5)


def test_an_export_and_an_import_hf_folder_teach_as_their_workdir(tiny_config, teacher_dir,
                                                                   tmp_path):
  """README: the teacher is any folder jaxret.load reads. The HF export of the teacher workdir,
  and that export imported back, give the workdir teacher's distillation term on one batch."""
  from jaxret import cli
  from jaxret.train.loop import distillation
  exported, imported = str(tmp_path / "hf"), str(tmp_path / "imported")
  cli.main(["export", "--workdir", teacher_dir, "--out", exported])
  cli.main(["import-hf", exported, "--out", imported])
  exp, params = _student(tiny_config, teacher_dir)
  options, workdir_teacher = distillation(exp, exp.cfg)
  batch = _first_batch(exp)
  _, out, _ = _value(exp, params, batch, options, workdir_teacher)
  want = float(out["distill"])
  for folder in (exported, imported):
    exp_f, _ = _student(tiny_config, folder)
    options_f, teacher = distillation(exp_f, exp_f.cfg)
    assert teacher.image_size == 32
    fed = dict(batch)
    # The export renumbers CLIP's end token (export/processor.py), so its tokenizer file is
    # not the student's: the step reads the teacher's own ids of the same captions.
    assert teacher.own_tokens
    fed["teacher_text"] = _first_batch(
        exp_f, teacher_tokens=(teacher.tokenizer_path, teacher.text_len))["teacher_text"]
    _, out_f, _ = _value(exp_f, params, fed, options_f, teacher)
    base._close(float(out_f["distill"]), want, rtol=1e-4, atol=1e-5)


def test_inspect_counts_the_teacher(tiny_config, teacher_dir):
  """`jaxret inspect` with an online teacher: its parameters per device as the real sharded
  teacher holds them, and its forward pass (the analytic count) added to the train FLOPs."""
  import jaxret
  from jaxret.experiment import Experiment
  from jaxret.inference.teacher import load_teacher
  from jaxret.train import planner
  from test_planner import analytic_train_flops
  mesh = {"data": 2, "fsdp": 4, "tensor": 1}
  exp = Experiment(tiny_config("softmax", *(f"mesh.{k}={v}" for k, v in mesh.items())))
  vocab = f"model.text.vocab_size={exp.tokenizer.vocab_size}"
  # The student at the teacher's 32 px, so the step does no resize (its interpolation is an
  # einsum the analytic count does not have).
  common = ("model.image.size=32", vocab, "model.remat=none")
  plain = planner.plan(tiny_config("softmax", *common), mesh, compile_activations=False)
  taught = planner.plan(tiny_config("softmax", *common, f"loss.distill.teacher={teacher_dir}"),
                        mesh, compile_activations=False)
  real = load_teacher(teacher_dir, exp.mesh, exp.rules, exp.tokenizer_path,
                      exp.cfg.model.text.max_len)
  per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(real.params))
  assert taught["teacher"]["bytes"] == per_device < sum(
      x.nbytes for x in jax.tree.leaves(real.params))  # FSDP really splits it
  model = jaxret.load(teacher_dir)
  assert taught["teacher"]["parameters"] == sum(x.size for x in jax.tree.leaves(model.params))
  local = exp.cfg.batch_size // (mesh["data"] * mesh["fsdp"])
  forward = analytic_train_flops(load_config_of(teacher_dir), local) / 3
  assert taught["teacher_flops_per_example"] == pytest.approx(forward, rel=0.1)
  added = taught["train_flops_per_example"] - plain["train_flops_per_example"]
  assert added == pytest.approx(forward, rel=0.1)
  text = planner.format_plan(taught, "demo")
  assert "teacher         " in text and "teacher  " in text.split("memory per device")[1]
  with pytest.raises(UserError, match="loss.distill.teacher '/nowhere' cannot be loaded"):
    planner.plan(tiny_config("softmax", *common, "loss.distill.teacher=/nowhere"), mesh)


def load_config_of(workdir):
  from jaxret.workdir import load_run_config
  return load_run_config(workdir)

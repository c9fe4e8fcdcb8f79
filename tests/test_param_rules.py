"""Per-parameter rules (optim.rules): frozen, lr_mult, wd_mult, load; fine-tuning at another
shape; the LiT config. Each check is against an independent reference: optax's own adamw/lamb,
Adam's first step written out, a fresh initialisation, the imported arrays, torch's interpolate."""
import os
import re
import shlex

import jax
import numpy as np
import optax
import pytest

from jaxret import cli, config
from jaxret.errors import UserError
from jaxret.optim import make_optimizer, param_setting
from jaxret.param_rules import param_paths, regex_mask

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIT = os.path.join(ROOT, "configs", "lit.py")
LOCK_IMAGE = "optim.rules=((r'image/.*|img_proj/.*', {'frozen': True}),)"


def _named(tree):
  return dict(zip(jax.tree.leaves(param_paths(tree)), (np.asarray(x) for x in jax.tree.leaves(tree))))


def _random_params(rng):
  f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
  return {"image": {"blk": {"kernel": f(6, 4), "bias": f(4)}, "pos_embedding": f(1, 5, 4)},
          "text": {"token_embedding": {"embedding": f(7, 4)}, "ln": {"scale": f(4), "bias": f(4)}},
          "img_proj": {"kernel": f(4, 3)}, "t": np.float32(2.6)}


def _optim(**kw):
  c = config.defaults()
  c.optim.update(**{"warmup_steps": 0, **kw})
  config.validate(c)  # as a loaded config: the rules in their checked form
  return c.optim


# ---------------------------------------------------------------------------- the optimizer

@pytest.mark.parametrize("name,mu_dtype", [("adamw", ""), ("adamw", "bfloat16"), ("lamb", "")])
def test_default_rules_are_optax_with_the_decay_mask(name, mu_dtype):
  """No rules: the same state pytree (old checkpoints restore) and bit-identical updates as
  chain(clip_by_global_norm, optax.adamw / optax.lamb(mask=decay_regex))."""
  rng = np.random.default_rng(0)
  params = _random_params(rng)
  cfg = _optim(name=name, mu_dtype=mu_dtype, warmup_steps=2)
  tx, _ = make_optimizer(cfg, 50)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, 2, 50, 0.0)
  mask = lambda p: regex_mask(p, r".*kernel|.*/token_embedding/embedding")  # noqa: E731
  kw = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
  inner = (optax.adamw(schedule, mu_dtype=mu_dtype or None, **kw) if name == "adamw"
           else optax.lamb(schedule, **kw))
  ref = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), inner)
  state, ref_state = tx.init(params), ref.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  p, q = params, params
  for i in range(5):
    scale = 10.0 if i % 2 else 0.01  # some steps clipped, some not
    g = jax.tree.map(lambda x: scale * rng.normal(size=np.shape(x)).astype(np.float32), params)
    u, state = tx.update(g, state, p)
    v, ref_state = ref.update(g, ref_state, q)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
  for (k, a), b in zip(_named(p).items(), _named(q).values()):
    np.testing.assert_array_equal(a, b, err_msg=k)


def test_frozen_parameters_hold_no_optimizer_state(tiny_config):
  """LiT's locked image side: Adam moments (mu, nu) exist for the other parameters only."""
  from jaxret.experiment import Experiment
  exp = Experiment(tiny_config("softmax", LOCK_IMAGE))
  nbytes = lambda x: int(np.prod(x.shape, dtype=int)) * x.dtype.itemsize  # noqa: E731
  params = dict(zip(jax.tree.leaves(param_paths(exp.abstract_state.params)),
                    jax.tree.leaves(exp.abstract_state.params)))
  trainable = sum(nbytes(x) for n, x in params.items() if not re.match("image/|img_proj/", n))
  frozen = sum(nbytes(x) for n, x in params.items() if re.match("image/|img_proj/", n))
  assert frozen > trainable / 10  # a real share of the model
  opt = jax.tree.leaves(exp.abstract_state.opt_state)
  moments = sum(nbytes(x) for x in opt if np.issubdtype(x.dtype, np.floating))
  assert moments == 2 * trainable  # mu and nu; the other leaves are int32 step counters
  assert all(x.shape == () for x in opt if not np.issubdtype(x.dtype, np.floating))


def test_frozen_gradients_do_not_count_in_clipping():
  """The clip norm is the trainable parameters' alone: with a huge gradient on a frozen leaf,
  the trainable leaves move as optax.adamw + clipping moves them without it."""
  rng = np.random.default_rng(1)
  params = _random_params(rng)
  cfg = _optim(rules=(("image/.*", {"frozen": True}),))
  tx, _ = make_optimizer(cfg, 50)
  g = jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32), params)
  g["image"]["blk"]["kernel"] *= 1e6
  u, _ = tx.update(g, tx.init(params), params)
  rest = {k: v for k, v in params.items() if k != "image"}
  ref = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), optax.adamw(
      cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
      mask=lambda p: regex_mask(p, cfg.decay_regex)))
  v, _ = ref.update({k: g[k] for k in rest}, ref.init(rest), rest)
  got = _named(u)
  for k, b in _named(v).items():
    np.testing.assert_array_equal(got[k], b, err_msg=k)
  assert all(not got[k].any() for k in got if k.startswith("image/"))


def _first_adamw_step(cfg, p, g, wd_mult, lr_mult):
  """AdamW's first step written out: bias-corrected mu = g, nu = g**2."""
  return -cfg.lr * lr_mult * (g / (np.sqrt(g * g) + cfg.eps) + cfg.weight_decay * wd_mult * p)


def test_lr_mult_scales_the_whole_first_step():
  rng = np.random.default_rng(2)
  params = _random_params(rng)
  cfg = _optim(grad_clip_norm=0.0, rules=(("text/.*", {"lr_mult": 0.5}), ("t", {"lr_mult": 3})))
  assert float(make_optimizer(cfg, 50)[1](0)) == np.float32(cfg.lr)  # no warmup: step 0 at peak
  tx, _ = make_optimizer(cfg, 50)
  g = jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32), params)
  u = _named(tx.update(g, tx.init(params), params)[0])
  decayed = _named(regex_mask(params, cfg.decay_regex))
  for name, p in _named(params).items():
    lr_mult = 0.5 if name.startswith("text/") else 3.0 if name == "t" else 1.0
    want = _first_adamw_step(cfg, p, _named(g)[name], float(decayed[name]), lr_mult)
    np.testing.assert_allclose(u[name], want, rtol=1e-6, atol=1e-9, err_msg=name)
  # The same parameters without the multiplier: exactly twice the step.
  u1 = _named(make_optimizer(_optim(grad_clip_norm=0.0), 50)[0].update(
      g, make_optimizer(_optim(grad_clip_norm=0.0), 50)[0].init(params), params)[0])
  np.testing.assert_array_equal(u["text/ln/scale"] * 2, u1["text/ln/scale"])


def test_wd_mult_scales_the_decoupled_decay():
  """Zero gradients: a parameter moves by exactly -lr * weight_decay * wd_mult * p."""
  rng = np.random.default_rng(3)
  params = _random_params(rng)
  cfg = _optim(rules=(("image/blk/bias", {"wd_mult": 2.0}), ("image/blk/kernel", {"wd_mult": 0.5}),
                      ("text/token_embedding/.*", {"wd_mult": 0})))
  tx, _ = make_optimizer(cfg, 50)
  zeros = jax.tree.map(np.zeros_like, params)
  u = _named(tx.update(zeros, tx.init(params), params)[0])
  mult = {"image/blk/bias": 2.0, "image/blk/kernel": 0.5, "img_proj/kernel": 1.0}  # others: 0
  for name, p in _named(params).items():
    np.testing.assert_allclose(u[name], -cfg.lr * cfg.weight_decay * mult.get(name, 0.0) * p,
                               rtol=1e-6, err_msg=name)


def test_first_matching_rule_gives_the_settings():
  """Per parameter, the first rule whose regex fully matches decides; settings it does not name
  take the defaults (wd_mult: 1 on decay_regex matches, else 0), not a later rule's value."""
  params = _random_params(np.random.default_rng(4))
  cfg = _optim(rules=(("image/.*/bias", {"lr_mult": 0.1}),
                      ("image/.*", {"frozen": True, "lr_mult": 0.5}),
                      (".*", {"wd_mult": 3.0}),
                      ("t", {"frozen": True})))  # never reached: '.*' matched first
  want = {  # name: (frozen, lr_mult, wd_mult)
      "image/blk/bias": (False, 0.1, 0.0),
      "image/blk/kernel": (True, 0.5, 1.0),
      "image/pos_embedding": (True, 0.5, 0.0),
      "text/ln/bias": (False, 1.0, 3.0),
      "text/token_embedding/embedding": (False, 1.0, 3.0),
      "img_proj/kernel": (False, 1.0, 3.0),
      "t": (False, 1.0, 3.0),
  }
  got = {k: _named(param_setting(cfg, params, k)) for k in ("frozen", "lr_mult", "wd_mult")}
  for name, (frozen, lr, wd) in want.items():
    assert (got["frozen"][name], got["lr_mult"][name], got["wd_mult"][name]) == (frozen, lr, wd), name


# ---------------------------------------------------------------------------- the config key

def test_rules_from_the_command_line_and_config_json(tiny_config):
  cfg = tiny_config("softmax", "optim.rules=(('image/.*', {'frozen': True}), ('t', {'lr_mult': 2}))")
  want = (("image/.*", {"frozen": True}), ("t", {"lr_mult": 2.0}))
  assert cfg.optim.rules == want
  assert config.from_json(cfg.to_json()).optim.rules == want  # JSON made them lists
  assert config.from_json(config.defaults().to_json()).optim.rules == ()


@pytest.mark.parametrize("override,message", [
    ("optim.rules=(('image/(', {'frozen': True}),)",
     r"optim.rules\[0\] \('image/\('\): not a valid regex"),
    ("optim.rules=(('image/.*', {'frozn': True}),)",
     r"optim.rules\[0\] \('image/.\*'\): unknown setting 'frozn' \(did you mean 'frozen'\?\)"),
    ("optim.rules=(('.*', {}), ('text/.*', {'lr_mult': -1}))",
     r"optim.rules\[1\] \('text/.\*'\): lr_mult must be a finite number >= 0, got -1"),
    ("optim.rules=(('text/.*', {'wd_mult': 1e999}),)",
     r"wd_mult must be a finite number >= 0, got inf"),
    ("optim.rules=(('image/.*', {'frozen': 'yes'}),)", r"frozen must be True or False, got 'yes'"),
    ("optim.rules=(('image/.*', {'load': 1}),)", r"load must be True or False, got 1"),
    ("optim.rules=('image/.*',)", r"optim.rules\[0\] is 'image/.\*': each rule is a \(regex"),
    ("optim.rules=5", r"optim.rules"),
    ("optim.decay_regex=.*kernel(", r"optim.decay_regex '.\*kernel\(' is not a valid regex"),
])
def test_bad_rules_are_one_line(tiny_config, override, message):
  with pytest.raises(UserError, match=message) as e:
    tiny_config("softmax", override)
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- training runs

def _run_params(cfg, workdir):
  from jaxret.experiment import Experiment
  from jaxret.workdir import restore_params
  params, _ = restore_params(Experiment(cfg).abstract_state, workdir)
  return _named(jax.device_get(params))


def test_frozen_tower_stays_put_and_lr_mult_zero_is_the_same(tiny_config, tmp_path):
  """LiT from a fresh init: the locked side equals a fresh init with the same seed after 3 steps,
  the text side moves; lr_mult=0 on the same side gives the same parameters (clipping off:
  with it, lr_mult=0 gradients still count in the norm and frozen ones do not).""" 
  from jaxret.experiment import Experiment, init_state
  from jaxret.train.loop import train
  common = ["total_steps=3", "optim.warmup_steps=1", "optim.grad_clip_norm=0.0"]
  frozen_cfg = tiny_config("softmax", *common, LOCK_IMAGE)
  zero_cfg = tiny_config("softmax", *common,
                         "optim.rules=((r'image/.*|img_proj/.*', {'lr_mult': 0.0}),)")
  train(frozen_cfg, str(tmp_path / "frozen"), progress=False)
  train(zero_cfg, str(tmp_path / "zero"), progress=False)
  exp = Experiment(frozen_cfg)
  fresh = _named(jax.device_get(init_state(exp.model, exp.tx, exp.mesh, 64, frozen_cfg.seed,
                                           exp.state_sh).params))
  frozen, zero = _run_params(frozen_cfg, str(tmp_path / "frozen")), _run_params(
      zero_cfg, str(tmp_path / "zero"))
  locked = [n for n in fresh if re.match("image/|img_proj/", n)]
  assert len(locked) > 10
  for n in locked:
    np.testing.assert_array_equal(frozen[n], fresh[n], err_msg=n)
  assert all(not np.array_equal(frozen[n], fresh[n]) for n in fresh
             if n.startswith("text/") and "kernel" in n)
  for n in locked:
    np.testing.assert_array_equal(zero[n], fresh[n], err_msg=n)
  # The trained side agrees to float noise only: the frozen run's program skips the locked
  # side's backward pass, so XLA fuses (and rounds) differently. Attention key biases are left
  # out: softmax ignores them, their gradient is pure rounding noise that Adam normalises.
  for n in fresh:
    if n not in locked and not n.endswith("key_bias"):
      np.testing.assert_allclose(zero[n], frozen[n], rtol=1e-4, atol=1e-6, err_msg=n)


# ---------------------------------------------------------------------------- init_from

@pytest.fixture(scope="module")
def hf_dir(tiny_config, tmp_path_factory):
  """A tiny CLIP trained 2 steps and exported as a transformers folder."""
  from jaxret.train.loop import train
  root = tmp_path_factory.mktemp("source")
  train(tiny_config("softmax", "total_steps=2", "optim.warmup_steps=1"), str(root / "run"),
        progress=False)
  cli.main(["export", "--workdir", str(root / "run"), "--out", str(root / "hf")])
  return str(root / "hf")


@pytest.fixture(scope="module")
def imported(hf_dir, demo_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("imported") / "imp")
  cli.main(["import-hf", hf_dir, "--out", out, "--tokenizer",
            os.path.join(demo_dir, "tokenizer.json")])
  return out


def test_partial_loading_keeps_the_fresh_init(tiny_config, imported):
  from jaxret.experiment import Experiment, init_state
  from jaxret.workdir import load_imported, load_initial_params
  cfg = tiny_config("softmax", "seed=7")
  exp = Experiment(cfg)

  def fresh():
    return init_state(exp.model, exp.tx, exp.mesh, 64, cfg.seed, exp.state_sh).params
  start = _named(jax.device_get(load_initial_params(
      imported, exp.abstract_state.params, exp.state_sh.params, False,
      rules=(("text/.*", {"load": False}),), fresh=fresh())))
  reference, saved = _named(jax.device_get(fresh())), _named(load_imported(imported))
  assert any(n.startswith("text/") for n in start) and any(n.startswith("image/") for n in start)
  for n, x in start.items():
    want = reference[n] if n.startswith("text/") else saved[n]
    np.testing.assert_array_equal(x, want, err_msg=n)
  assert not np.array_equal(saved["text/pos_embedding"], reference["text/pos_embedding"])


def _torch_resize(table, new_grid, cls):
  """timm's resample_abs_pos_embed: the grid through torch bilinear, align_corners=False,
  antialias=False; the cls row untouched."""
  import torch.nn.functional as F
  extra = 1 if cls else 0
  n, d = table.shape[1] - extra, table.shape[2]
  old = int(round(n ** 0.5))
  grid = torch.from_numpy(table[0, extra:].reshape(old, old, d)).permute(2, 0, 1)[None]
  out = F.interpolate(grid, size=(new_grid, new_grid), mode="bilinear", align_corners=False,
                      antialias=False)[0].permute(1, 2, 0).reshape(1, -1, d).numpy()
  return np.concatenate([table[:, :extra], out], axis=1)


@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("old,new", [(4, 6), (6, 4), (7, 3)])
def test_image_position_embeddings_resample_as_timm(cls, old, new):
  from jaxret.workdir import resize_pos_embedding
  table = np.random.default_rng(old * new).normal(size=(1, old * old + cls, 8)).astype(np.float32)
  got = resize_pos_embedding("image/pos_embedding", table, (1, new * new + cls, 8), cls)
  np.testing.assert_allclose(got, _torch_resize(table, new, cls), atol=1e-6)
  if cls:
    np.testing.assert_array_equal(got[:, 0], table[:, 0])


def test_text_position_embeddings_truncate_or_interpolate():
  import torch.nn.functional as F
  from jaxret.workdir import resize_pos_embedding
  table = np.random.default_rng(5).normal(size=(1, 16, 8)).astype(np.float32)
  np.testing.assert_array_equal(resize_pos_embedding("text/pos_embedding", table, (1, 10, 8), False),
                                table[:, :10])
  longer = F.interpolate(torch.from_numpy(table).permute(0, 2, 1), size=24, mode="linear",
                         align_corners=False).permute(0, 2, 1).numpy()
  # float32 interpolation weights computed two ways: equal to a few ulps.
  np.testing.assert_allclose(resize_pos_embedding("text/pos_embedding", table, (1, 24, 8), False),
                             longer, rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match="'text/pos_embedding' is \\(1, 16, 8\\) there but \\(1, 24, 4\\)"):
    resize_pos_embedding("text/pos_embedding", table, (1, 24, 4), False)
  with pytest.raises(UserError, match="square"):
    resize_pos_embedding("image/pos_embedding", table[:, :13], (1, 17, 8), True)


def test_fine_tune_at_a_larger_image_size(tiny_config, imported, tmp_path):
  """Imported at 64 px (4x4 patches + cls), trained at 96 (6x6): the run starts from the
  timm-resampled table; the image side is locked, so it is still there after the steps."""
  from jaxret.train.loop import train
  from jaxret.workdir import load_imported
  cfg = tiny_config("softmax", "model.image.size=96", f"model.init_from={imported}",
                    "total_steps=2", "optim.warmup_steps=1", LOCK_IMAGE)
  train(cfg, str(tmp_path / "run"), progress=False)
  got, saved = _run_params(cfg, str(tmp_path / "run")), _named(load_imported(imported))
  assert saved["image/pos_embedding"].shape == (1, 17, 32) and got["image/pos_embedding"].shape == (1, 37, 32)
  np.testing.assert_allclose(got["image/pos_embedding"],
                             _torch_resize(saved["image/pos_embedding"], 6, True), atol=1e-6)
  for n in got:
    if n.startswith("image/") and n != "image/pos_embedding":
      np.testing.assert_array_equal(got[n], saved[n], err_msg=n)
  # Other shape differences still fail, naming the parameter.
  with pytest.raises(UserError, match="parameter 'image/patch_embed/kernel' is \\(16, 16, 3, 32\\)"):
    train(tiny_config("softmax", "model.image.patch_size=8", f"model.init_from={imported}"),
          str(tmp_path / "bad"), progress=False)


# ---------------------------------------------------------------------------- configs/lit.py

def _docstring_commands(path):
  """The `jaxret ...` commands a config's docstring shows (continuation lines joined)."""
  import ast
  doc = ast.get_docstring(ast.parse(open(path).read())).replace("\\\n", " ")
  return [shlex.split(line.strip()) for line in doc.splitlines() if line.strip().startswith("jaxret ")]


def test_lit_config_runs_as_its_docstring_says(hf_dir, demo_dir, tmp_path, capsys):
  from conftest import TINY
  from jaxret.workdir import load_imported
  commands = _docstring_commands(LIT)
  assert [c[:2] for c in commands] == [["jaxret", "import-hf"], ["jaxret", "train"]]
  places = {"HF_DIR": hf_dir, "IMPORTED": str(tmp_path / "imported"), "DATA": demo_dir,
            "runs/lit": str(tmp_path / "lit"), "configs/lit.py": LIT}

  def fill(arg):
    for k, v in places.items():
      arg = arg.replace(k, v)
    return arg
  # Without model.init_from the run stops at once and says what to pass.
  with pytest.raises(SystemExit):
    cli.main([fill(a) for a in commands[1][1:] if "init_from" not in a] +
             [f"--config.{o}" for o in TINY])
  assert "--config.model.init_from=IMPORTED" in capsys.readouterr().err
  cli.main([fill(a) for a in commands[0][1:]])
  cli.main([fill(a) for a in commands[1][1:]] + [f"--config.{o}" for o in TINY + ["total_steps=3"]])
  cfg = config.from_json(open(tmp_path / "lit" / "config.json").read())
  got, saved = _run_params(cfg, str(tmp_path / "lit")), _named(load_imported(places["IMPORTED"]))
  assert set(got) == set(saved)
  for n in got:
    if re.match("image/|img_proj/", n):
      np.testing.assert_array_equal(got[n], saved[n], err_msg=n)
    elif "kernel" in n:
      assert not np.array_equal(got[n], saved[n]), n

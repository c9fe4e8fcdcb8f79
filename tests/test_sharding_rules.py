"""Sharding rules as config data (`mesh.rules`): defaults that shard exactly as the rules
written in code did, overrides and config.json round trips, one-line errors, and one report
per parameter dimension that the mesh does not divide."""
import json
import logging
import os
import shlex

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ROOT, TINY
from jaxret import cli, config
from jaxret.errors import UserError
from jaxret.experiment import Experiment, dummy_inputs
from jaxret.models.layers import ACTIVATION_AXES, PARAM_AXES
from jaxret.models.two_tower import build_model
from jaxret.param_rules import param_paths
from jaxret.train import planner
from jaxret.train.loop import train

DEMO = os.path.join(ROOT, "configs", "demo.py")
MESH_222 = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")

# The rules as they were written in jaxret/parallel/partitioning.py before they became config
# data, when activations shared the parameters' names: the reference the defaults must match.
OLD_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
             ("heads", "tensor"), ("vocab", "tensor"), ("kv", None), ("length", None),
             ("joint", None), ("layers", None))
OLD_NAME = {"act_batch": "batch", "act_length": "length", "act_embed": "embed",
            "act_mlp": "mlp", "act_heads": "heads", "act_kv": "kv"}


def model_config(loss="softmax", *overrides):
  """The tiny demo model without data (the vocabulary stated)."""
  return config.load(f"{DEMO}:{loss}", TINY + ["model.text.vocab_size=64", *overrides])


def variants():
  """Every way the models annotate: CLIP towers, SigLIP towers (MAP head), scanned blocks."""
  return [model_config("softmax"), model_config("siglip"), model_config("softmax", "model.scan=true")]


# ----------------------------------------------------------------------- the default rules

def _block(prefix):
  """Expected mesh axes of one pre-LN block's parameters on data=2,fsdp=2,tensor=2, written
  out by hand: model width over fsdp, heads and MLP units over tensor, head size unsplit."""
  out = {f"{prefix}/attn/{w}_kernel": ("fsdp", "tensor", None) for w in ("query", "key", "value")}
  out.update({f"{prefix}/attn/{w}_bias": ("tensor", None) for w in ("query", "key", "value")})
  out.update({f"{prefix}/attn/out_kernel": ("tensor", None, "fsdp"),
              f"{prefix}/attn/out_bias": ("fsdp",),
              f"{prefix}/mlp/fc1/kernel": ("fsdp", "tensor"), f"{prefix}/mlp/fc1/bias": ("tensor",),
              f"{prefix}/mlp/fc2/kernel": ("tensor", "fsdp"), f"{prefix}/mlp/fc2/bias": ("fsdp",)})
  out.update({f"{prefix}/{ln}/{w}": ("fsdp",) for ln in ("ln1", "ln2") for w in ("scale", "bias")})
  return out


def expected_param_specs(vocab_size):
  ln = lambda name: {f"{name}/scale": ("fsdp",), f"{name}/bias": ("fsdp",)}  # noqa: E731
  return {
      **_block("image/encoder/block00"), **_block("text/encoder/block00"),
      **ln("image/ln_pre"), **ln("image/ln_post"), **ln("text/ln_final"),
      "image/cls": (None, None, "fsdp"),
      "image/patch_embed/kernel": (None, None, None, "fsdp"),
      "image/pos_embedding": (None, None, "fsdp"),
      "text/pos_embedding": (None, None, "fsdp"),
      # Rows over tensor, unless tensor=2 does not divide the vocabulary (then replicated).
      "text/token_embedding/embedding": ("tensor" if vocab_size % 2 == 0 else None, "fsdp"),
      "img_proj/kernel": ("fsdp", None),
      "txt_proj/kernel": ("fsdp", None),
      "t": (),
  }


def test_default_param_shardings_match_the_table_and_are_reported_once(tiny_config, caplog,
                                                                       tmp_path):
  cfg = tiny_config("softmax", *MESH_222, "total_steps=2", "optim.warmup_steps=1",
                    "checkpoint.every=0")
  assert cfg.mesh.rules == config.MESH_RULES
  with caplog.at_level(logging.WARNING, logger="jaxret"):
    exp = Experiment(cfg)
  specs = {n: tuple(s.spec) for n, s in zip(jax.tree.leaves(param_paths(exp.state_sh.params)),
                                            jax.tree.leaves(exp.state_sh.params))}
  vocab = exp.tokenizer.vocab_size
  assert specs == expected_param_specs(vocab)
  # The demo tokenizer's vocabulary is odd: its one undivided dimension is reported, once.
  assert vocab % 2 == 1
  reports = [r.getMessage() for r in caplog.records if r.name == "jaxret"]
  assert len(reports) == 1
  assert "text/token_embedding/embedding" in reports[0] and f"({vocab})" in reports[0]
  assert "tensor=2" in reports[0]

  # A whole run (steps, checkpoint, final evaluation) builds its shardings once: one report.
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxret"):
    train(cfg, str(tmp_path), progress=False)
  assert len([r for r in caplog.records if r.name == "jaxret"]) == 1


def _recorded(model, image_size, monkeypatch):
  """The logical names of every activation constraint the model applies."""
  seen = set()

  def record(x, names, *args, **kwargs):
    seen.add(tuple(names))
    return x
  monkeypatch.setattr(nn, "with_logical_constraint", record)
  jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model, image_size, 2)))
  monkeypatch.undo()
  return seen


def test_activation_constraints_shard_as_before(monkeypatch):
  # Expected mesh axes by hand: the batch over data x fsdp (so the width, which fsdp splits in
  # a weight, stays whole), heads and MLP units over tensor; the token table's rows keep the
  # parameter's 'vocab' split.
  expected = {
      ("act_batch", "act_length", "act_embed"): P(("data", "fsdp"), None, None),
      ("act_batch", "act_length", "act_heads", "act_kv"): P(("data", "fsdp"), None, "tensor", None),
      ("act_batch", "act_length", "act_mlp"): P(("data", "fsdp"), None, "tensor"),
      ("vocab", None): P("tensor", None),
  }
  seen = set()
  for cfg in variants():
    seen |= _recorded(build_model(cfg.model), cfg.model.image.size, monkeypatch)
  assert seen == set(expected)
  for names, spec in expected.items():
    assert nn.logical_to_mesh_axes(names, config.MESH_RULES) == spec
    # ... and what the old shared names gave under the old rules.
    old = tuple(OLD_NAME.get(n, n) for n in names)
    assert nn.logical_to_mesh_axes(old, OLD_RULES) == spec


def test_models_use_exactly_the_declared_logical_names(monkeypatch):
  param_names, act_names = set(), set()
  for cfg in variants():
    model = build_model(cfg.model)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                              *dummy_inputs(model, cfg.model.image.size, 2)))
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
      param_names |= {n for n in leaf.names if n}
    act_names |= {n for names in _recorded(model, cfg.model.image.size, monkeypatch)
                  for n in names if n}
  assert param_names == set(PARAM_AXES)
  assert act_names == set(ACTIVATION_AXES) | {"vocab"}
  assert {n for n, _ in config.MESH_RULES} == set(PARAM_AXES) | set(ACTIVATION_AXES)


# ------------------------------------------------------------- overrides, JSON, bad rules

def test_rules_override_from_the_command_line_and_round_trip_json(tiny_config):
  rules = "(('embed', None), ('mlp', 'tensor'), ('act_batch', ['data', 'fsdp']))"
  cfg = tiny_config("softmax", "mesh.data=1", "mesh.fsdp=8", f"mesh.rules={rules}")
  assert cfg.mesh.rules == (("embed", None), ("mlp", "tensor"), ("act_batch", ("data", "fsdp")))
  saved = cfg.to_json()
  assert json.loads(saved)["mesh"]["rules"][2] == ["act_batch", ["data", "fsdp"]]  # lists in JSON
  assert config.from_json(saved).mesh.rules == cfg.mesh.rules
  exp = Experiment(cfg)
  # 'embed' no longer splits weights over fsdp; 'heads' has no rule: replicated.
  block = exp.state_sh.params["image"]["encoder"]["block00"]
  assert tuple(block["mlp"]["fc1"]["kernel"].spec) == (None, "tensor")
  assert tuple(block["attn"]["query_kernel"].spec) == (None, None, None)


def test_a_config_json_without_rules_gets_the_defaults():
  path = os.path.join(ROOT, "tests", "fixtures", "run_v0", "workdir", "config.json")
  with open(path) as f:
    text = f.read()
  assert "rules" not in json.loads(text)["mesh"]
  assert config.from_json(text).mesh.rules == config.MESH_RULES


@pytest.mark.parametrize("rules, message", [
    ("(('embed', 'fdsp'),)", "names mesh axis 'fdsp' (did you mean 'fsdp'?)"),
    ("(('embd', 'fsdp'),)", "no logical axis 'embd' (did you mean 'embed'?)"),
    # The name activations had before they were named apart.
    ("(('batch', ('data', 'fsdp')),)", "no logical axis 'batch' (did you mean 'act_batch'?)"),
    ("(('embed',),)", "is not a (logical name, mesh axes) pair"),
    ("(('embed', 3),)", "are not a name, a tuple of names or None"),
    ("(('embed', ('fsdp', 'fsdp')),)", "names a mesh axis twice"),
    ("'embed'", "config key 'mesh.rules' expects tuple"),
    # The pipeline and the loss kernels split the batch over ('data', 'fsdp') themselves.
    ("(('embed', 'fsdp'), ('act_batch', 'data'))", "maps 'act_batch' to ('data',)"),
    ("(('embed', 'fsdp'),)", "maps 'act_batch' to None"),
])
def test_bad_rules_are_one_line(rules, message):
  with pytest.raises(UserError, match=r"mesh\.rules") as err:
    from jaxret.experiment import load_config
    load_config(f"{DEMO}:softmax", ["model.text.vocab_size=64", f"mesh.rules={rules}"])
  assert message in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ undivided dimensions

def test_an_undivided_vocabulary_is_reported_once_and_replicated():
  cfg = model_config("softmax", "model.text.vocab_size=45")
  p = planner.plan(cfg, {"data": 2, "fsdp": 2, "tensor": 2}, compile_activations=False)
  assert len(p["undivided"]) == 1
  r = p["undivided"][0]
  assert (r["path"], r["dim"], r["size"], r["axes"]) == ("text/token_embedding/embedding", 0, 45,
                                                       ("tensor",))
  # [45, 32] float32, the width split over fsdp=2: 45 * 16 * 4 bytes held, half if split.
  assert (r["bytes_per_device"], r["bytes_if_divided"]) == (2880, 1440)
  spec = {n: s for n, _, _, s, _ in p["shardings"]}["text/token_embedding/embedding"]
  assert spec == (None, "fsdp")
  out = planner.format_plan(p, "tiny")
  section = out.split("not sharded as the rules ask")[1]
  assert "text/token_embedding/embedding [45, 32]" in section and "tensor=2" in section


def test_a_divisible_config_reports_nothing():
  cfg = model_config("softmax", "model.text.vocab_size=46")
  p = planner.plan(cfg, {"data": 2, "fsdp": 2, "tensor": 2}, compile_activations=False)
  assert p["undivided"] == []
  assert "not sharded as the rules ask" not in planner.format_plan(p, "tiny")


# README, "Scaling up": the commands as shown, run as a shell would split them.
README_REPORT = """\
jaxret inspect --config configs/demo.py:softmax --mesh data=2,fsdp=2,tensor=2 --no-compile --config.model.text.vocab_size=45"""
README_REPORT_TAIL = """\
not sharded as the rules ask (mesh.rules; replicated on these dimensions)
  text/token_embedding/embedding [45, 128] float32: dimension 0 (45) is not divisible by tensor=2, replicated there instead: 11.2 KiB per device instead of 5.6 KiB (+5.6 KiB, before optimizer moments)"""
README_RULES = """\
jaxret inspect --config configs/demo.py:softmax --mesh data=2,fsdp=2,tensor=2 --no-compile --config.model.text.vocab_size=45 --config.mesh.rules="(('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'), ('act_batch', ('data', 'fsdp')), ('act_mlp', 'tensor'), ('act_heads', 'tensor'))\""""


def _inspect(command, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  cli.main(shlex.split(command)[1:])
  return capsys.readouterr().out


def test_readme_inspect_commands(capsys, monkeypatch):
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  for shown in (README_REPORT, README_REPORT_TAIL, README_RULES):
    assert shown in readme
  # 45 x 128 float32 = 23,040 bytes, / fsdp=2 = 11,520 (11.2 KiB) per device; 5.6 KiB if split.
  assert _inspect(README_REPORT, capsys, monkeypatch).rstrip().endswith(README_REPORT_TAIL)
  out = _inspect(README_RULES, capsys, monkeypatch)
  assert "not sharded" not in out
  table = next(line for line in out.splitlines() if "text/token_embedding/embedding" in line)
  assert "(-, fsdp)" in table  # no 'vocab' rule: the rows are whole, the width over fsdp

"""Config loading, validation and the full-size SigLIP B/16 config (abstract shapes only)."""
import os
import textwrap

import jax
import numpy as np
import pytest

from jaxret import config
from jaxret.experiment import load_config
from jaxret.errors import UserError
from jaxret.eval.suite import check_tasks
from jaxret.models.two_tower import build_model
from jaxret.parallel.mesh import make_mesh, mesh_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


@pytest.mark.parametrize("loss", ["softmax", "sigmoid", "filip"])
def test_demo_config_loads_for_each_loss(loss):
  cfg = config.load(f"{DEMO}:{loss}")
  assert cfg.loss.name == loss
  assert (cfg.model.init_bias is not None) == (loss == "sigmoid")


def test_override_is_typed_and_applied():
  cfg = config.load(f"{DEMO}:softmax", ["batch_size=64", "model.image.pool=gap",
                                        "checkpoint.async_save=false", "eval.ks=(1, 3)",
                                        "optim.lr=3e-4"])
  assert cfg.batch_size == 64 and cfg.model.image.pool == "gap"
  assert cfg.checkpoint.async_save is False and tuple(cfg.eval.ks) == (1, 3)
  assert cfg.optim.lr == pytest.approx(3e-4)


def test_a_list_of_names_can_be_typed_with_commas():
  # As a user types it on the command line; the literal form still works, and a name the
  # evaluation does not have is still refused (when training or evaluation starts).
  for raw, want in [("retrieval,zeroshot", ("retrieval", "zeroshot")), ("retrieval", ("retrieval",)),
                    ("('retrieval', 'hubness')", ("retrieval", "hubness"))]:
    assert tuple(config.load(f"{DEMO}:softmax", [f"eval.tasks={raw}"]).eval.tasks) == want
  typo = config.load(f"{DEMO}:softmax", ["eval.tasks=retreival,zeroshot"]).eval.tasks
  with pytest.raises(UserError, match="did you mean 'retrieval'"):
    check_tasks(typo)


@pytest.mark.parametrize("override, needle", [
    ("batch_sise=3", "did you mean 'batch_size'"),
    ("model.image.widht=3", "did you mean 'model.image.width'"),
    ("batch_size=abc", "expects int"),
    ("loss.name=sigmod", "did you mean 'sigmoid'"),
    ("model.image.pool=mapp", "did you mean 'map'"),
    ("model.image.width=130", "divisible by model.image.num_heads"),
    ("checkpoint.async_save=maybe", "true or false"),
    ("data.augment.crop_scale=(0.5, 1.5)", "data.augment.crop_scale must be (min, max)"),
    ("data.augment.crop_ratio=(2.0, 1.0)", "data.augment.crop_ratio must be (min, max)"),
    ("model.image.std=(0.5, 0.0, 0.5)", "model.image.std must be 3 per-channel values > 0"),
    ("data.mixture=('laion:0',)", "data.mixture entry 'laion:0' needs a positive weight"),
])
def test_bad_override_is_one_clear_line(override, needle):
  with pytest.raises(UserError) as e:
    load_config(f"{DEMO}:softmax", [override])
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_misspelled_key_in_config_file(tmp_path):
  locked = tmp_path / "locked.py"
  locked.write_text(textwrap.dedent("""
      from jaxret.config import defaults
      def get_config(arg=None):
        c = defaults()
        c.model.embed_dmi = 3
        return c
  """))
  with pytest.raises(UserError, match="embed_dmi"):
    config.load(str(locked))
  # A config built without defaults() is checked key by key against the schema.
  plain = tmp_path / "plain.py"
  plain.write_text(textwrap.dedent("""
      import ml_collections
      def get_config(arg=None):
        return ml_collections.ConfigDict({"optim": {"warmup_step": 5}})
  """))
  with pytest.raises(UserError, match="optim.warmup_step.*did you mean 'warmup_steps'"):
    config.load(str(plain))


def test_missing_config_file_and_sigmoid_without_bias():
  with pytest.raises(UserError, match="not found"):
    config.load("configs/nope.py")
  with pytest.raises(UserError, match="needs a bias"):
    load_config(f"{DEMO}:softmax", ["loss.name=sigmoid"])


def test_mesh_must_fit_the_devices():
  assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(UserError, match="needs 4 devices but 8"):
    mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(UserError, match="not divisible"):
    mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def _block(d, m):
  # q, k, v, out kernels + biases; two MLP layers + biases; two LayerNorms.
  return 4 * d * d + 4 * d + 2 * d * m + m + d + 4 * d


def test_siglip_b16_config_builds_abstract_shapes_without_allocating():
  # The config takes the vocabulary from the data's tokenizer; the paper's is 32k.
  cfg = config.load(os.path.join(ROOT, "configs", "siglip_b16.py"), ["model.text.vocab_size=32000"])
  model = build_model(cfg.model)
  before = len(jax.live_arrays())
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             np.zeros((1, 224, 224, 3), np.float32),
                                             np.zeros((1, 64), np.int32)))
  assert len(jax.live_arrays()) == before
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  d, m, n = 768, 3072, (224 // 16) ** 2
  vision = (16 * 16 * 3 * d + d) + n * d + 12 * _block(d, m) + 2 * d \
      + (d + 4 * d * d + 4 * d + 2 * d + 2 * d * m + m + d)          # MAP head
  text = 32000 * d + 64 * d + 12 * _block(d, m) + 2 * d + (d * d + d)
  assert count == vision + text + 2                                  # + t and b
  assert 202e6 < count < 204e6  # the published SigLIP B/16 has ~203M parameters
  assert shapes["params"]["b"].value.shape == ()


# ------------------------------------------------------------------ what may change on resume

def test_every_key_has_a_resume_tag_and_every_tag_a_key():
  keys = config.dotted_keys(config.defaults())
  tags = {k: config.resume_tag(k) for k in keys}  # raises for a key without one
  assert set(tags.values()) <= {config.FIXED, config.FREE, config.SAME_PROCESSES}
  for entry in config.RESUME_TAGS:
    assert any(k == entry or k.startswith(entry + ".") for k in keys), entry
  # The run-defining keys the resume check must catch, and those it must let through.
  for k in ("seed", "batch_size", "data.dir", "data.mixture", "data.workers", "optim.lr",
            "optim.rules", "model.image.width", "loss.name"):
    assert tags[k] == config.FIXED, k
  for k in ("total_steps", "eval.tasks", "log_every", "checkpoint.every", "data.eval_split"):
    assert tags[k] == config.FREE, k
  assert tags["mesh.fsdp"] == tags["mesh.rules"] == config.SAME_PROCESSES


def test_data_workers_change_breaks_the_iterator_state(demo_dir):
  """Why data.workers is FIXED: grain's saved state from 0 workers does not restore into 2."""
  import json
  from jaxret.data import pipeline

  def make(workers):
    return pipeline.train_iterator(demo_dir, batch_size=16, text_len=16, seed=0,
                                   process_index=0, process_count=1, workers=workers,
                                   image_size=32)
  it = make(0)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  other = make(2)
  with pytest.raises(Exception):
    other.set_state(state)
    next(other)
  other.close()


def test_resume_refuses_a_changed_run_and_takes_safe_changes(tiny_config, tmp_path):
  from jaxret.train.loop import train
  from jaxret.workdir import check_workdir_config
  work = str(tmp_path)
  base = ["total_steps=2", "optim.warmup_steps=1"]
  train(tiny_config("softmax", *base), work, progress=False)
  for change, key in (("batch_size=32", "batch_size"), ("seed=1", "seed"),
                      ("optim.lr=0.01", "optim.lr"), ("data.workers=1", "data.workers"),
                      ("data.augment.flip=true", "data.augment.flip"),
                      ("optim.rules=(('t', {'frozen': True}),)", "optim.rules")):
    with pytest.raises(UserError, match=rf"holds a run with {key}=.*use a new --workdir"):
      check_workdir_config(work, tiny_config("softmax", *base, change))
  # Extending the run, changing the evaluation and the mesh (same process count) are let
  # through (restoring onto another mesh is orbax's resharding: test_export restores an
  # fsdp=2 run on one device).
  check_workdir_config(work, tiny_config("softmax", "total_steps=3", "optim.warmup_steps=1",
                                         "eval.ks=(1, 2)", "mesh.fsdp=2", "checkpoint.every=3"))

"""Model zoo configs: published shapes (checked against known parameter counts), a launch
command in every docstring, abstract evaluation only (nothing is allocated)."""
import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from jaxret import config
from jaxret.models.two_tower import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
             if not p.endswith("demo.py"))

# transformers' CLIPModel.num_parameters() for OpenAI's released checkpoints.
PUBLISHED = {"clip_b32": 151_277_313, "clip_b16": 149_620_737, "clip_l14": 427_616_513}


def abstract_params(cfg):
  model = build_model(cfg.model)
  s, n = cfg.model.image.size, cfg.model.text.max_len
  return jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, s, s, 3), np.float32),
                                           np.zeros((1, n), np.int32)))["params"]


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_zoo_has_the_issue_models():
  assert {"clip_b32", "clip_b16", "clip_l14", "siglip_b16", "filip_b32", "filip_l14"} <= set(ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_config_loads_and_says_how_to_launch(name):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert f"jaxret train --config configs/{name}.py" in module.__doc__
  cfg = config.load(path)
  assert cfg.batch_size >= 1024


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_clip_parameter_counts_match_the_released_models(name):
  cfg = config.load(os.path.join(ROOT, "configs", f"{name}.py"))
  assert count(abstract_params(cfg)) == PUBLISHED[name]


@pytest.mark.parametrize("name", ["filip_b32", "filip_l14"])
def test_filip_projects_tokens_to_a_shared_256_space(name):
  cfg = config.load(os.path.join(ROOT, "configs", f"{name}.py"))
  params = abstract_params(cfg)
  assert params["img_proj"]["kernel"].value.shape[-1] == 256
  assert params["txt_proj"]["kernel"].value.shape[-1] == 256
  assert cfg.optim.name == "lamb" and cfg.loss.filip_token_fraction == 0.25
  # The same towers as the CLIP of that size, apart from the projections.
  clip = config.load(os.path.join(ROOT, "configs", name.replace("filip", "clip") + ".py"))
  d_img, d_txt = cfg.model.image.width, cfg.model.text.width
  assert count(abstract_params(clip)) - count(params) == (d_img + d_txt) * (clip.model.embed_dim - 256)

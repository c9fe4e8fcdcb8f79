"""Model zoo configs: published shapes (checked against known parameter counts), a launch
command in every docstring, abstract evaluation only (nothing is allocated)."""
import importlib.util
import os

import jax
import numpy as np
import pytest

from jaxret import config
from jaxret.errors import UserError
from jaxret.models.two_tower import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = ["clip.py:b32", "clip.py:b16", "clip.py:l14", "siglip_b16.py", "filip.py:b32",
       "filip.py:l14"]

# transformers' CLIPModel.num_parameters() for OpenAI's released checkpoints.
PUBLISHED = {"clip.py:b32": 151_277_313, "clip.py:b16": 149_620_737,
             "clip.py:l14": 427_616_513}


def load(spec):
  return config.load(os.path.join(ROOT, "configs", spec))


def abstract_params(cfg, vocab_size=49408):
  """Abstract parameters with the data's vocabulary taken as OpenAI's BPE (the zoo configs take
  it from the data's tokenizer)."""
  model = build_model(cfg.model, vocab_size=vocab_size)
  s, n = cfg.model.image.size, cfg.model.text.max_len
  return jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, s, s, 3), np.float32),
                                           np.zeros((1, n), np.int32)))["params"]


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("spec", ZOO)
def test_zoo_config_loads_and_says_how_to_launch(spec):
  path = os.path.join(ROOT, "configs", spec.split(":")[0])
  module_spec = importlib.util.spec_from_file_location("zoo", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  assert f"jaxret train --config configs/{spec}" in module.__doc__
  assert load(spec).batch_size >= 1024


@pytest.mark.parametrize("spec", ZOO + ["lit.py"])
def test_zoo_vocabulary_comes_from_the_data_unless_pinned(spec):
  assert load(spec).model.text.vocab_size == 0
  pinned = config.load(os.path.join(ROOT, "configs", spec), ["model.text.vocab_size=32000"])
  assert pinned.model.text.vocab_size == 32000
  assert count(abstract_params(pinned, None)) - count(abstract_params(pinned, 31000)) == (
      1000 * pinned.model.text.width)


def test_unknown_variant_is_one_line():
  with pytest.raises(UserError, match="unknown CLIP variant 'b64'; valid: b32, b16, l14"):
    load("clip.py:b64")


@pytest.mark.parametrize("spec", sorted(PUBLISHED))
def test_clip_parameter_counts_match_the_released_models(spec):
  assert count(abstract_params(load(spec))) == PUBLISHED[spec]


@pytest.mark.parametrize("variant", ["b32", "l14"])
def test_filip_projects_tokens_to_a_shared_256_space(variant):
  cfg = load(f"filip.py:{variant}")
  params = abstract_params(cfg)
  assert params["img_proj"]["kernel"].value.shape[-1] == 256
  assert params["txt_proj"]["kernel"].value.shape[-1] == 256
  assert cfg.optim.name == "lamb" and cfg.loss.filip_token_fraction == 0.25
  # The same towers as the CLIP of that size, apart from the projections.
  clip = load(f"clip.py:{variant}")
  d_img, d_txt = cfg.model.image.width, cfg.model.text.width
  assert count(abstract_params(clip)) - count(params) == (d_img + d_txt) * (clip.model.embed_dim - 256)

"""A run built from a config: mesh, tokenizer, model, loss, optimizer and the train state's
shardings (what train, eval and export share), and the train state pytree itself."""
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxret import config, losses
from jaxret.data.sources import load_manifest, parse_mixture
from jaxret.data.tokenizers import load_tokenizer
from jaxret.errors import UserError, did_you_mean
from jaxret.models import attention, text as text_mod, vit
from jaxret.models.layers import ACTIVATIONS, LOGICAL_AXES, REMAT_POLICIES
from jaxret.models.two_tower import build_model
from jaxret.optim import OPTIMIZERS, make_optimizer
from jaxret.parallel import partitioning
from jaxret.parallel.mesh import BATCH_AXES, batch_parallelism, make_mesh


def load_config(spec, overrides=()):
  """`path/to/config.py[:arg]` with `key=value` overrides, checked key by key and component by
  component: what `jaxret train` and `jaxret inspect` run."""
  cfg = config.load(spec, overrides)
  check_components(cfg)
  return cfg


def check_components(cfg):
  """The config's choices among the components (pools, activations, remat policies, losses,
  optimizers, mixtures) exist: one-line UserErrors naming the valid ones."""
  if cfg.model.image.pool not in vit.POOLS:
    raise UserError(f"unknown model.image.pool '{cfg.model.image.pool}'"
                    f"{did_you_mean(cfg.model.image.pool, vit.POOLS)}; valid: {', '.join(vit.POOLS)}")
  if cfg.model.text.pool not in text_mod.POOLS:
    raise UserError(f"unknown model.text.pool '{cfg.model.text.pool}'"
                    f"{did_you_mean(cfg.model.text.pool, text_mod.POOLS)}; valid: "
                    f"{', '.join(text_mod.POOLS)}")
  if cfg.model.remat not in REMAT_POLICIES:
    raise UserError(f"unknown model.remat '{cfg.model.remat}'"
                    f"{did_you_mean(cfg.model.remat, REMAT_POLICIES)}; valid: "
                    f"{', '.join(REMAT_POLICIES)}")
  if cfg.model.attention not in attention.IMPLEMENTATIONS:
    raise UserError(f"unknown model.attention '{cfg.model.attention}'"
                    f"{did_you_mean(cfg.model.attention, attention.IMPLEMENTATIONS)}; valid: "
                    f"{', '.join(attention.IMPLEMENTATIONS)}")
  if cfg.model.act not in ACTIVATIONS:
    raise UserError(f"unknown model.act '{cfg.model.act}'{did_you_mean(cfg.model.act, ACTIVATIONS)}"
                    f"; valid: {', '.join(ACTIVATIONS)}")
  parse_mixture(cfg.data.mixture)
  loss = losses.get_loss(cfg.loss.name, cfg.loss)  # UserErrors name the valid losses and options
  if loss.uses_bias and cfg.model.init_bias is None:
    raise UserError(f"loss '{loss.name}' needs a bias: set model.init_bias (SigLIP: -10)")
  if cfg.optim.name not in OPTIMIZERS:
    raise UserError(f"unknown optim.name '{cfg.optim.name}'"
                    f"{did_you_mean(cfg.optim.name, OPTIMIZERS)}; valid: {', '.join(OPTIMIZERS)}")
  # Shapes and mesh axes of the rules are checked by config.validate; the names here.
  partitioning.check_logical_names(cfg.mesh.rules, LOGICAL_AXES)
  # The input batch and the loss kernels split the batch over BATCH_AXES themselves; a rule
  # that put activations' batch elsewhere would disagree with them.
  batch = next((axes for name, axes in cfg.mesh.rules if name == "act_batch"), None)
  batch = (batch,) if isinstance(batch, str) else tuple(batch or ())
  if batch != BATCH_AXES:
    raise UserError(f"mesh.rules maps 'act_batch' to {batch or None}, but the input pipeline and "
                    f"the loss kernels split the batch over {BATCH_AXES}; keep ('act_batch', "
                    f"{BATCH_AXES})")


class Experiment:
  """Everything a config builds before the first step (shared by train, eval and export)."""

  def __init__(self, cfg, devices=None, *, tokenizer_path=None, manifest=None):
    """`tokenizer_path`, `manifest`: a run's own (its workdir's copies, see
    workdir.run_tokenizer_path) instead of data.dir's."""
    check_components(cfg)
    self.cfg = cfg
    self.mesh = make_mesh(cfg.mesh, devices)
    # Training refuses an attention these devices lack (check_attention, called by the trainer
    # before any compile); evaluation and export compute with xla instead: same parameters.
    self.platform = self.mesh.devices.flat[0].platform
    self.attention = attention.for_platform(cfg.model.attention, self.platform, cfg.model.dtype)
    n, p = batch_parallelism(self.mesh), jax.process_count()
    if cfg.batch_size % n or cfg.batch_size % p:
      raise UserError(f"batch_size {cfg.batch_size} must be divisible by the {n} batch-parallel "
                      f"devices and {p} processes; change --config.batch_size")
    self.manifest = manifest if manifest is not None else load_manifest(cfg.data.dir)
    self.tokenizer_path = tokenizer_path or os.path.join(cfg.data.dir, self.manifest["tokenizer"])
    self.tokenizer = load_tokenizer(self.tokenizer_path, cfg.model.text.max_len)
    want_vocab = cfg.model.text.vocab_size
    if want_vocab and want_vocab != self.tokenizer.vocab_size:
      raise UserError(f"model.text.vocab_size is {want_vocab} but the tokenizer of "
                      f"'{cfg.data.dir}' has {self.tokenizer.vocab_size}; set it to 0 (from the "
                      "tokenizer) or use the matching data")
    self.model = build_model(cfg.model, vocab_size=self.tokenizer.vocab_size,
                             pad_id=self.tokenizer.pad_id, eos_id=self.tokenizer.eos_id,
                             attention=self.attention)
    self.loss = losses.get_loss(cfg.loss.name, cfg.loss)
    self.tx, self.schedule = make_optimizer(cfg.optim, cfg.total_steps)
    # Tracing the model (train step, init, embedding) needs these with the mesh:
    # partitioning.activate(exp.mesh, exp.rules).
    self.rules = cfg.mesh.rules
    self.abstract_state, self.state_sh = state_shardings(self.model, self.tx, self.mesh,
                                                         cfg.model.image.size, self.rules)

  def check_attention(self):
    """For training: one line refusing a `model.attention` these devices lack."""
    attention.check_backend(self.cfg.model.attention, self.platform, self.cfg.model.dtype)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def dummy_inputs(model, image_size, batch):
  return (jnp.zeros((batch, image_size, image_size, 3), jnp.float32),
          jnp.zeros((batch, model.text.max_len), jnp.int32))


def abstract_boxed_params(model, mesh, image_size):
  """The parameters as eval_shape sees them, each with its logical axis names (no allocation)."""
  n = batch_parallelism(mesh)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), *dummy_inputs(model, image_size, n)))["params"]


def state_shardings(model, tx, mesh, image_size, rules=partitioning.DEFAULT_RULES):
  """-> (abstract TrainState of ShapeDtypeStructs carrying shardings, sharding tree), no allocation.

  Logs one warning per parameter dimension that the rules ask to split but the mesh axes do
  not divide (it is replicated instead); this runs once per run, not per step.
  """
  boxed = abstract_boxed_params(model, mesh, image_size)
  param_sh = partitioning.logical_shardings(boxed, mesh, rules)
  partitioning.warn_undivided(partitioning.undivided(boxed, mesh, rules))
  abstract_params = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Optimizer moments shard like their parameters; counters and the like are replicated.
  # Frozen parameters (optim.rules) hold no moments: optax leaves a MaskedNode in their place.
  opt_sh = optax.tree_map_params(
      tx, lambda v, s: v if isinstance(v, optax.MaskedNode) else s, abstract_opt, param_sh,
      transform_non_params=lambda _: partitioning.replicated(mesh),
      is_leaf=lambda v: isinstance(v, optax.MaskedNode))
  shardings = TrainState(step=partitioning.replicated(mesh), params=param_sh, opt_state=opt_sh)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def init_state(model, tx, mesh, image_size, seed, shardings, rules=partitioning.DEFAULT_RULES):
  """Initialise parameters and optimizer state directly in their target shardings."""
  n = batch_parallelism(mesh)

  def init(rng):
    params = nn.unbox(model.init(rng, *dummy_inputs(model, image_size, n)))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  with partitioning.activate(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))

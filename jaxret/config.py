"""Experiment configs: the schema of valid keys, loading `file.py:arg`, overrides, validation.

A config file defines `get_config(arg) -> ConfigDict`. It should start from `defaults()` (a
locked ConfigDict, so a misspelled assignment fails at once) and change what it needs. Any
config, however built, is checked key by key against `defaults()`: an unknown key fails with
its dotted name and the nearest valid one.
"""
import ast
import importlib.util
import json
import math
import os
import re

import ml_collections

from jaxret.errors import UserError, did_you_mean

# Every loss option with its default (checked by jaxret/losses/registry.py); the config's
# `loss` section has exactly these keys (plus `name`). The filip_* keys only matter to FILIP,
# the triplet_* keys to triplet.
LOSS_OPTIONS = dict(
    impl="all_gather",           # "all_gather" (memory b x B) | "ring" (memory b x b)
    # How the ring's blocks travel: "auto" (this backend's entry of losses/common.py's measured
    # RING_MOVES table) | "ppermute" | "swaps" (pairwise; small blocks on even rings).
    ring_moves="auto",
    # Keep each example's top fraction of tokens before communication (the paper's 0.25).
    # Chosen against the local batch, so below 1.0 the loss depends on the sharding.
    filip_token_fraction=0.25,
    filip_comm_dtype="float32",  # dtype texts are communicated in: float32 | bfloat16 | float16
    filip_special_tokens=True,   # score the image cls / text end token too
    filip_chunk=32,              # examples per side of one similarity tile (0: a whole block)
    # triplet (VSE++): the hinge's margin on cosine similarities (the paper's 0.2), and whether
    # each positive pair pays for its hardest negative only (VSE++) or for all of them (VSE0).
    triplet_margin=0.2,
    triplet_max_violation=True,
)

# Logical axis name -> mesh axis (a name, a tuple of names, or None: replicated), the default
# of `mesh.rules` (jaxret/parallel/partitioning.py applies them). Tried in order; a mesh axis
# is used at most once per array, and a name no rule maps is replicated. Parameters and
# activations have names of their own, so moving one never moves the other.
MESH_RULES = (
    # parameters (and their optimizer moments)
    ("embed", "fsdp"),            # FSDP: the model width of every weight
    ("mlp", "tensor"),            # tensor parallel: MLP hidden units,
    ("heads", "tensor"),          # attention heads,
    ("vocab", "tensor"),          # and the token table's rows
    ("kv", None),
    ("length", None),             # position embeddings
    ("joint", None),              # the shared embedding space of the projections
    ("layers", None),             # the stacked axis of scanned encoder blocks
    # activations: the batch over data x fsdp, hidden units and heads over tensor
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
)


# The settings an `optim.rules` entry may give a parameter, with the value a parameter has when
# no rule names it (wd_mult's default comes from optim.decay_regex instead). jaxret/optim.py
# applies frozen, lr_mult and wd_mult; jaxret/workdir.py applies load (model.init_from).
PARAM_SETTINGS = dict(
    frozen=False,   # no update and no optimizer state; its gradient is not computed or clipped
    lr_mult=1.0,    # scales the parameter's whole update (weight-decay term included)
    wd_mult=1.0,    # scales the decoupled weight decay (optim.weight_decay)
    load=True,      # model.init_from loads it (false: it keeps its fresh initialisation)
)


def defaults() -> ml_collections.ConfigDict:
  """Every valid key, with its default. Model defaults are a tiny CLIP."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128          # global batch, split over processes and the ('data','fsdp') axes
  c.total_steps = 1000
  c.log_every = 10
  c.eval_every = 0            # 0: evaluate only at the end

  # workers: grain worker processes decoding training batches (0: threads in this process).
  # mixture: train on several converted folders, ("dir:weight", ...), drawn in proportion to
  # the weights; they must share data.dir's tokenizer, and evaluation stays on data.dir.
  # augment: training random-resized-crop (open_clip's default scale) and horizontal flip (off:
  # captions that say "left"/"right" would lie). Evaluation resizes and center-crops.
  # hard_negatives: k swapped captions per example (jaxret/data/caption_swaps.py: from the demo's
  # scene metadata, else rule-based word swaps) that join the losses' image->text side as
  # columns that are never positive (NegCLIP); 0: none.
  c.data = dict(dir="demo_data", train_split="train", eval_split="test", workers=0,
                hard_negatives=0,
                mixture=(), augment=dict(crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3),
                                         flip=False, enabled=True))

  c.model = dict(
      embed_dim=128, image_proj=True, text_proj_bias=False,
      init_scale=1 / 0.07, init_bias=None, max_scale=100.0,
      act="gelu_tanh", ln_eps=1e-5,
      # Memory and speed: compute dtype (params and optimizer state stay float32), per-block
      # rematerialisation policy (see models/layers.py REMAT_POLICIES), nn.scan over layers.
      dtype="float32", remat="none", scan=False,
      # How the encoders' attention product is computed (the params are the same for all):
      # "xla" anywhere, "cudnn" flash attention on GPU (bfloat16), "splash" Pallas kernel on TPU.
      attention="xla",
      # A folder written by `jaxret import-hf`: a fresh run starts from those weights.
      init_from="",
      # mean/std: per-channel pixel normalisation the weights expect (0.5: pixels in [-1, 1]).
      image=dict(size=64, patch_size=16, width=128, depth=2, num_heads=4, mlp_dim=512, pool="cls",
                 pre_norm=True, patch_bias=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
      # vocab_size 0: take it from the data's tokenizer (a full-size config states it).
      text=dict(vocab_size=0, max_len=16, width=128, depth=2, num_heads=4, mlp_dim=512, causal=True,
                pool="eos"),
  )
  c.model.init_bias = ml_collections.config_dict.placeholder(float)

  # distill (jaxret/losses/distill.py): add weight x KL of the student's image->text and
  # text->image similarity distributions to a frozen teacher's (any folder `jaxret.load`
  # reads), both at `temperature`; hard_weighting: weigh examples by the teacher's difficulty.
  # source "online": the teacher runs in the step; "offline": data.dir's records carry its
  # embeddings (`jaxret data teacher`). teacher "" (the default): no distillation.
  c.loss = dict(name="softmax", **LOSS_OPTIONS,
                distill=dict(teacher="", weight=1.0, temperature=0.07, hard_weighting=False,
                             source="online"))

  c.optim = dict(
      name="adamw", mu_dtype="",  # mu_dtype "bfloat16": AdamW first moment in bf16
      # GradCache: split each batch into this many micro-batches, exact contrastive gradients.
      grad_accum_steps=1,
      lr=1e-3, end_lr=0.0, warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6,
      # Global-norm clipping; frozen parameters' gradients do not count (see jaxret/optim.py).
      grad_clip_norm=1.0,
      # Divergence (jaxret/train/health.py): 0 stops at the first non-finite loss or gradient,
      # before it can be saved; N skips such updates (optax.apply_if_finite), counts them
      # (optim/skipped_total) and stops after N in a row.
      skip_nonfinite=0,
      # The default weight-decay multiplier (wd_mult) of a parameter no rule sets it for: 1 where
      # this regex over '/'-joined paths matches (dense, conv and attention kernels and the token
      # table), 0 elsewhere (norms, biases, position embeddings, the temperature). It stays a key
      # of its own, read by the rules below, rather than being translated into a rule: every
      # run's config.json (tests/fixtures/run_v0 included) holds it, so old workdirs load as they
      # are, and a rule that sets only `frozen` or `lr_mult` leaves decay as it was.
      decay_regex=r".*kernel|.*/token_embedding/embedding",
      # Per-parameter settings: ((regex, {setting: value}), ...) over '/'-joined parameter paths
      # ('image/encoder/block00/attn/query_kernel', 'text/pos_embedding', 't'). The first rule
      # whose regex fully matches a path gives that parameter its settings (big_vision's first
      # match wins); settings it does not name keep their defaults (PARAM_SETTINGS, wd_mult from
      # decay_regex). LiT: (('image/.*', {'frozen': True}),).
      rules=(),
  )

  # Axis sizes (-1: all remaining devices) and the logical-axis rules (see MESH_RULES).
  c.mesh = dict(data=-1, fsdp=1, tensor=1, rules=MESH_RULES)

  c.checkpoint = dict(every=100, keep=3, async_save=True)
  # Evaluations (jaxret/eval/suite.py): run by `jaxret eval`, every eval_every steps and at
  # the end of training. Every task runs on any converted data; zeroshot is skipped, with one
  # printed line, on a set that has no classes (see zeroshot_classes). Also valid, not run by
  # default: "compositional" (true caption vs swapped variants; skipped, with one printed
  # line, when no caption has a word to swap).
  c.eval = dict(
      batch_size=250, ks=(1, 5, 10),
      tasks=("retrieval", "hubness", "zeroshot"),
      # Named evaluation sets, each reported under its name: ("NAME=DIR:SPLIT", ...), e.g.
      # ("coco5k=/data/coco:test", "f30k=/data/f30k:test"); "NAME=DIR" takes data.eval_split,
      # "NAME=:SPLIT" data.dir. (): the one set data.dir:data.eval_split, reported as before.
      # Every set's captions are tokenized with the run's tokenizer (data.dir's).
      sets=(),
      captions_per_image=0,          # 0: every caption of an image (COCO/Flickr protocol: 5)
      block_elements=1 << 24,        # scores held per query block (bounds memory)
      curve_max_k=50,                # Recall@K curve length saved for plots
      filip_exact_max_pairs=4_000_000,  # FILIP scores every pair only up to images x captions
      filip_rerank_k=20,             # FILIP two-stage: pooled top-k candidates per query
      hubness_bank=5000,             # training records in the QB-Norm / DBNorm banks (0: all)
      hubness_beta=20.0,             # inverted-softmax temperature (QB-Norm's default)
      hubness_beta_gallery=20.0,     # DBNorm's gallery-bank temperature
      hubness_topk=1,                # QB-Norm activation set: bank queries' top-k items
      # Zero-shot classes: a text file, one class per line (`NAME` or `KEY<TAB>NAME`, KEY being
      # what records' labels say); "": the data's own (the demo's manifest, a TFDS source's
      # ClassLabel names). Records' labels: see jaxret/data/classes.py.
      zeroshot_classes="",
      # Prompts, "{}" standing for the class name; (): the demo's on the demo data ("a {} in
      # the top left", ...), otherwise OpenAI's ImageNet style "a photo of a {}.".
      zeroshot_templates=(),
      zeroshot_ks=(1, 5),
  )
  c.lock()
  return c


# May a key change when a run resumes from its workdir? A key takes the tag of its longest
# dotted prefix listed here; tests/test_config.py checks that every key of defaults() has one
# and that no entry names a key that does not exist, so keys added later declare theirs.
#   FIXED: the value shapes what the run computes (model, loss, optimizer and its schedule
#          shape, batch, seed, data and its order): a resume with another value is refused.
#   FREE: evaluation, logging and checkpoint cadence; total_steps, to extend a run (the
#         cosine schedule then stretches to the new end from the resume step on).
#   SAME_PROCESSES: the mesh, which may change only at the same process count, since each
#         process reads its own rows of every batch (orbax reshards the arrays).
FIXED, FREE, SAME_PROCESSES = "fixed", "free", "same process count"
RESUME_TAGS = {
    "seed": FIXED, "batch_size": FIXED, "total_steps": FREE, "log_every": FREE,
    "eval_every": FREE,
    "data": FIXED,
    "data.eval_split": FREE,
    # grain's iterator state is per worker layout: 0 -> 2 workers fails to restore (measured
    # with grain 0.2.18; see tests/test_config.py), so the count is part of the data order.
    "data.workers": FIXED,
    "model": FIXED,
    "model.init_from": FREE,  # read only by the first step of a run
    "loss": FIXED,
    "optim": FIXED,
    "mesh": SAME_PROCESSES,
    "checkpoint": FREE,
    "eval": FREE,
}


def resume_tag(key):
  """FIXED, FREE or SAME_PROCESSES for a dotted key ('optim.lr')."""
  parts = key.split(".")
  for n in range(len(parts), 0, -1):
    tag = RESUME_TAGS.get(".".join(parts[:n]))
    if tag is not None:
      return tag
  raise KeyError(f"config key '{key}' has no resume tag: add it to config.RESUME_TAGS")


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """Load `path/to/file.py[:arg]`, apply `key=value` overrides, validate against the schema."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file '{path}' not found: pass --config path/to/file.py[:arg]")
  module_spec = importlib.util.spec_from_file_location("jaxret_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"config file '{path}' has a syntax error at line {e.lineno}: {e.msg}") from e
  if not hasattr(module, "get_config"):
    raise UserError(f"config file '{path}' defines no get_config(arg) function")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except AttributeError as e:  # assignment of a key that a locked defaults() does not have
    raise UserError(f"config file '{path}': {_unknown_key_message(e)}") from e
  except ValueError as e:
    raise UserError(f"config file '{path}' (arg {arg!r}): {e}") from e
  cfg = merge(cfg)
  for item in overrides:
    apply_override(cfg, item)
  validate(cfg)
  return cfg


def from_json(text: str) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir."""
  cfg = merge(ml_collections.ConfigDict(json.loads(text)))
  validate(cfg)
  return cfg


def _unknown_key_message(err):
  # ml_collections: "Key 'x' does not exist and cannot be added since the config is locked..."
  msg = str(err).strip("'\"")
  return msg.split(". Other fields")[0].split("\n")[0]


def merge(user) -> ml_collections.ConfigDict:
  """defaults() updated with `user`, failing on any key the schema does not have."""
  out = defaults()

  def walk(dst, src, prefix):
    for key, value in src.items():
      name = prefix + key
      if key not in dst:
        raise UserError(f"unknown config key '{name}'{did_you_mean(key, dst.keys())}")
      if isinstance(dst[key], ml_collections.ConfigDict):
        if not isinstance(value, (dict, ml_collections.ConfigDict)):
          raise UserError(f"config key '{name}' is a section; set its fields, e.g. {name}.x")
        walk(dst[key], value, name + ".")
      else:
        _assign(dst, key, value, name)

  walk(out, user, "")
  return out


def _assign(section, key, value, name):
  if isinstance(value, list):
    value = tuple(value)
  try:
    with section.unlocked():
      setattr(section, key, value)
  except TypeError as e:
    current = section[key]
    raise UserError(f"config key '{name}' expects {type(current).__name__}, got "
                    f"{value!r}") from e


def apply_override(cfg, item: str):
  """Apply one `a.b.c=value` override; the value is a Python literal or a bare string."""
  key, eq, raw = item.partition("=")
  if not eq:
    raise UserError(f"override '--config.{item}' needs a value: --config.{key}=VALUE")
  section, parts = cfg, key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(section, ml_collections.ConfigDict) or part not in section:
      raise UserError(f"unknown config key '{key}'{did_you_mean(key, dotted_keys(cfg))}")
    if i < len(parts) - 1:
      section = section[part]
  last = parts[-1]
  if isinstance(section[last], ml_collections.ConfigDict):
    raise UserError(f"config key '{key}' is a section; override its fields, e.g. {key}.x=...")
  current = section[last]
  if isinstance(current, bool) or (current is None and raw.lower() in ("true", "false")):
    if raw.lower() not in ("true", "false", "1", "0"):
      raise UserError(f"config key '{key}' expects true or false, got {raw!r}")
    value = raw.lower() in ("true", "1")
  elif isinstance(current, str):
    value = raw
  else:
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    if isinstance(value, str) and isinstance(current, tuple) and all(
        isinstance(x, str) for x in current):
      # A list of names as one types it: eval.tasks=retrieval,zeroshot
      value = tuple(p.strip() for p in value.split(",") if p.strip())
  _assign(section, last, value, key)


def dotted_keys(cfg, prefix=""):
  """All leaf keys of a config as 'a.b.c' names."""
  out = []
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += dotted_keys(value, f"{prefix}{key}.")
    else:
      out.append(prefix + key)
  return out


def validate(cfg):
  """Checks of values and across keys; the choices among components (pools, activations,
  losses, optimizers, mixtures) are checked by jaxret.experiment.check_components."""
  if cfg.batch_size <= 0:
    raise UserError(f"batch_size must be positive, got {cfg.batch_size}")
  if cfg.total_steps <= 0:
    raise UserError(f"total_steps must be positive, got {cfg.total_steps}")
  if cfg.optim.warmup_steps >= cfg.total_steps:
    raise UserError(f"optim.warmup_steps ({cfg.optim.warmup_steps}) must be below total_steps "
                    f"({cfg.total_steps})")
  if cfg.model.init_scale <= 0 or cfg.model.init_scale > cfg.model.max_scale:
    raise UserError(f"model.init_scale must be in (0, max_scale={cfg.model.max_scale}], got "
                    f"{cfg.model.init_scale}")
  for tower in ("image", "text"):
    t = cfg.model[tower]
    if t.width % t.num_heads:
      raise UserError(f"model.{tower}.width ({t.width}) must be divisible by "
                      f"model.{tower}.num_heads ({t.num_heads})")
  if cfg.model.dtype not in ("float32", "bfloat16"):
    raise UserError(f"model.dtype must be float32 or bfloat16, got '{cfg.model.dtype}'")
  for key in ("mean", "std"):
    v = cfg.model.image[key]
    if len(v) != 3 or (key == "std" and min(v) <= 0):
      raise UserError(f"model.image.{key} must be 3 per-channel values{' > 0' if key == 'std' else ''}"
                      f", got {tuple(v)}")
  aug = cfg.data.augment
  lo, hi = aug.crop_scale
  if not 0 < lo <= hi <= 1:
    raise UserError(f"data.augment.crop_scale must be (min, max) with 0 < min <= max <= 1, got "
                    f"{tuple(aug.crop_scale)}")
  lo, hi = aug.crop_ratio
  if not 0 < lo <= hi:
    raise UserError(f"data.augment.crop_ratio must be (min, max) with 0 < min <= max, got "
                    f"{tuple(aug.crop_ratio)}")
  d = cfg.loss.distill
  if d.teacher:
    if not (isinstance(d.weight, (int, float)) and d.weight > 0):
      raise UserError(f"loss.distill.weight must be > 0, got {d.weight!r}")
    if not (isinstance(d.temperature, (int, float)) and d.temperature > 0):
      raise UserError(f"loss.distill.temperature must be > 0, got {d.temperature!r}")
    if d.source not in ("online", "offline"):
      raise UserError(f"loss.distill.source must be 'online' or 'offline', got {d.source!r}")
  k = cfg.data.hard_negatives
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise UserError(f"data.hard_negatives must be a whole number >= 0 (swapped captions per "
                    f"example; 0: none), got {k!r}")
  if cfg.optim.mu_dtype not in ("", "bfloat16", "float32"):
    raise UserError(f"optim.mu_dtype must be '', 'float32' or 'bfloat16', got "
                    f"'{cfg.optim.mu_dtype}'")
  if cfg.optim.mu_dtype and cfg.optim.name != "adamw":
    raise UserError(f"optim.mu_dtype applies to adamw only; unset it for '{cfg.optim.name}'")
  if cfg.optim.grad_accum_steps < 1 or cfg.batch_size % cfg.optim.grad_accum_steps:
    raise UserError(f"optim.grad_accum_steps ({cfg.optim.grad_accum_steps}) must be >= 1 and "
                    f"divide batch_size ({cfg.batch_size})")
  if not math.isfinite(cfg.optim.lr) or cfg.optim.lr <= 0:
    raise UserError(f"optim.lr must be positive, got {cfg.optim.lr}")
  if cfg.optim.skip_nonfinite < 0:
    raise UserError(f"optim.skip_nonfinite must be 0 (stop at the first non-finite step) or N > 0 "
                    f"(skip such steps, stop after N in a row), got {cfg.optim.skip_nonfinite}")
  parse_eval_sets(cfg.eval.sets)
  check_local_data(cfg)
  for t in cfg.eval.zeroshot_templates:
    if not isinstance(t, str) or "{}" not in t:
      raise UserError(f"eval.zeroshot_templates entry {t!r} has no '{{}}' for the class name, "
                      "e.g. 'a photo of a {}.'")
  # Stored back in one form: JSON (config.json) turns the pairs into lists.
  cfg.optim.rules = check_param_rules(cfg.optim.rules, cfg.optim.decay_regex)
  cfg.mesh.rules = normalise_rules(cfg.mesh.rules, [k for k in cfg.mesh if k != "rules"])


def check_local_data(cfg):
  """ArrayRecord reads local files only: data in a bucket is read through a gcsfuse mount.
  (Workdirs may be in a bucket; data dirs may not.)"""
  dirs = [("data.dir", cfg.data.dir)] + [("data.mixture", m) for m in cfg.data.mixture] + \
      [("eval.sets", d) for _, d, _ in parse_eval_sets(cfg.eval.sets)]
  for key, path in dirs:
    if "://" in str(path):
      raise UserError(f"{key} '{path}' is in a bucket, but the data pipeline (ArrayRecord) reads "
                      "local files only: mount the bucket with gcsfuse (`gcsfuse --implicit-dirs "
                      "BUCKET /mnt/BUCKET`) and pass the mounted path, e.g. "
                      "--config.data.dir=/mnt/BUCKET/records")


def parse_eval_sets(entries):
  """`eval.sets` -> [(name, dir, split)]; dir or split is "" where the entry leaves it to
  data.dir or data.eval_split. Names become metric keys (eval/NAME/...) and file names."""
  if isinstance(entries, str) or not isinstance(entries, (tuple, list)):
    raise UserError(f"eval.sets must be a tuple of 'NAME=DIR:SPLIT' strings, got {entries!r}")
  out = []
  for entry in entries:
    name, eq, where = str(entry).partition("=")
    path, sep, split = where.rpartition(":")
    if not sep or "/" in split:  # no split given (or the ':' was part of the path: gs://)
      path, split = where, ""
    if not eq or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or not (path or split):
      raise UserError(f"eval.sets entry {entry!r}: write 'NAME=DIR:SPLIT' (NAME of letters, "
                      "digits, '_', '.', '-'), e.g. 'coco5k=/data/coco:test'")
    if name in [n for n, _, _ in out]:
      raise UserError(f"eval.sets names '{name}' twice: give each set its own name")
    out.append((name, path, split))
  return out


def check_param_rules(rules, decay_regex=".*"):
  """-> `optim.rules` as ((regex, {setting: value}), ...), multipliers as floats; a bad regex,
  an unknown setting or a bad value is a one-line UserError naming the rule."""
  try:
    re.compile(decay_regex)
  except (re.error, TypeError) as e:
    raise UserError(f"optim.decay_regex {decay_regex!r} is not a valid regex: {e}") from e
  example = "e.g. (('image/.*', {'frozen': True}),)"
  if not isinstance(rules, (tuple, list)):
    raise UserError(f"optim.rules must be a tuple of (regex, {{setting: value}}) pairs, {example};"
                    f" got {rules!r}")
  out = []
  for i, rule in enumerate(rules):
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)
        or not isinstance(rule[1], (dict, ml_collections.ConfigDict))):
      raise UserError(f"optim.rules[{i}] is {rule!r}: each rule is a (regex, {{setting: value}}) "
                      f"pair, {example}")
    regex, settings = rule[0], dict(rule[1])
    where = f"optim.rules[{i}] ({regex!r})"
    try:
      re.compile(regex)
    except re.error as e:
      raise UserError(f"{where}: not a valid regex ({e})") from e
    for name, value in settings.items():
      if name not in PARAM_SETTINGS:
        raise UserError(f"{where}: unknown setting '{name}'{did_you_mean(name, PARAM_SETTINGS)}; "
                        f"valid: {', '.join(PARAM_SETTINGS)}")
      if isinstance(PARAM_SETTINGS[name], bool):
        if not isinstance(value, bool):
          raise UserError(f"{where}: {name} must be True or False, got {value!r}")
      elif (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise UserError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
      else:
        settings[name] = float(value)
    out.append((regex, settings))
  return tuple(out)


def normalise_rules(rules, mesh_axes):
  """`mesh.rules` as a tuple of (logical name, mesh axis | tuple of mesh axes | None) pairs.

  JSON (config.json) and `--config.mesh.rules=[...]` may give lists; they become tuples, so a
  saved config compares equal to the one that wrote it. Whether the models use each logical
  name is checked with the models (jaxret.experiment.check_components).
  """
  def bad(what):
    return UserError(f"mesh.rules: {what}; expected ((logical name, mesh axis | (axes, ...) | "
                     f"None), ...), e.g. (('embed', 'fsdp'), ('act_batch', ('data', 'fsdp')))")

  if isinstance(rules, str) or not isinstance(rules, (tuple, list)):
    raise bad(f"got {rules!r}")
  out = []
  for pair in rules:
    if isinstance(pair, str) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise bad(f"{pair!r} is not a (logical name, mesh axes) pair")
    name, axes = pair
    if not isinstance(name, str) or not name:
      raise bad(f"the logical name of {tuple(pair)!r} is not a name")
    names = (axes,) if isinstance(axes, str) else axes
    if names is None:
      names = ()
    if not isinstance(names, (tuple, list)) or not all(isinstance(a, str) for a in names):
      raise bad(f"the mesh axes of {tuple(pair)!r} are not a name, a tuple of names or None")
    for a in names:
      if a not in mesh_axes:
        raise UserError(f"mesh.rules: ({name!r}, {axes!r}) names mesh axis '{a}'"
                        f"{did_you_mean(a, mesh_axes)}; mesh axes are {', '.join(mesh_axes)}")
    if len(set(names)) != len(names):
      raise bad(f"{tuple(pair)!r} names a mesh axis twice")
    out.append((name, axes if isinstance(axes, str) or axes is None else tuple(axes)))
  return tuple(out)

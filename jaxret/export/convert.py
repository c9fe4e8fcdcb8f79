"""The parameter table: each jaxret parameter ('/'-joined path) <-> a transformers state-dict key.

Every conversion is a transpose or reshape (no arithmetic), so export followed by import
gives back the same bits. Export and import walk the same `rules(...)` list; both check that
every parameter on each side is claimed by exactly one rule, so nothing is silently dropped.
"""
from typing import Callable, NamedTuple

import numpy as np


class Rule(NamedTuple):
  jax: tuple            # one or more jaxret paths (several: a packed torch tensor)
  torch: str
  to_torch: Callable    # list of jax arrays -> torch-layout array
  to_jax: Callable      # (torch-layout array, list of jax shapes) -> list of jax arrays


# --- layouts; `s` is the list of jaxret shapes on the way back
def _same():
  return (lambda a: a[0]), (lambda w, s: [w.reshape(s[0])])


def _dense():  # Dense kernel [in, out] -> Linear weight [out, in]
  return (lambda a: a[0].T), (lambda w, s: [w.T.reshape(s[0])])


def _conv():  # HWIO -> OIHW
  return (lambda a: a[0].transpose(3, 2, 0, 1)), (lambda w, s: [w.transpose(2, 3, 1, 0)])


def _reshape(ndim):  # drop leading 1s: position table [1,N,D] -> [N,D], class token -> [D]
  return (lambda a: a[0].reshape(a[0].shape[-ndim:])), (lambda w, s: [w.reshape(s[0])])


def _pos():
  return _reshape(2)


def _cls():
  return _reshape(1)


def _scalar_1():  # SigLIP stores its scale and bias as shape [1]
  return (lambda a: a[0].reshape(1)), (lambda w, s: [w.reshape(s[0])])


def _heads_in():  # [D, H, Dh] -> [H*Dh, D]
  return (lambda a: a[0].reshape(a[0].shape[0], -1).T), (lambda w, s: [w.T.reshape(s[0])])


def _heads_out():  # [H, Dh, D] -> [D, H*Dh]
  return (lambda a: a[0].reshape(-1, a[0].shape[-1]).T), (lambda w, s: [w.T.reshape(s[0])])


def _packed(one):  # q, k, v stacked along the output rows (nn.MultiheadAttention's in_proj)
  fwd, back = one()

  def to_jax(w, s):
    parts = np.split(w, 3, axis=0)
    return [back(p, [shape])[0] for p, shape in zip(parts, s)]
  return (lambda a: np.concatenate([fwd([x]) for x in a], axis=0)), to_jax


def _rule(jax, torch, layout):
  fwd, back = layout()
  return Rule(tuple(jax) if isinstance(jax, (list, tuple)) else (jax,), torch, fwd, back)


def _flat_bias():  # per-head bias [H, Dh] -> [H*Dh]
  return (lambda a: a[0].reshape(-1)), (lambda w, s: [w.reshape(s[0])])


def _ln(j, t):
  return [_rule(f"{j}/scale", f"{t}.weight", _same), _rule(f"{j}/bias", f"{t}.bias", _same)]


def _linear(j, t):
  return [_rule(f"{j}/kernel", f"{t}.weight", _dense), _rule(f"{j}/bias", f"{t}.bias", _same)]


def _attention(j, t):
  out = []
  for name, short in (("query", "q"), ("key", "k"), ("value", "v")):
    out += [_rule(f"{j}/{name}_kernel", f"{t}.{short}_proj.weight", _heads_in),
            _rule(f"{j}/{name}_bias", f"{t}.{short}_proj.bias", _flat_bias)]
  return out + [_rule(f"{j}/out_kernel", f"{t}.out_proj.weight", _heads_out),
                _rule(f"{j}/out_bias", f"{t}.out_proj.bias", _same)]


def _encoder(j, t, depth):
  out = []
  for i in range(depth):
    b, l = f"{j}/encoder/block{i:02d}", f"{t}.encoder.layers.{i}"
    out += (_ln(f"{b}/ln1", f"{l}.layer_norm1") + _attention(f"{b}/attn", f"{l}.self_attn") +
            _ln(f"{b}/ln2", f"{l}.layer_norm2") + _linear(f"{b}/mlp/fc1", f"{l}.mlp.fc1") +
            _linear(f"{b}/mlp/fc2", f"{l}.mlp.fc2"))
  return out


def _text(model_cfg, clip):
  t = "text_model"
  return ([_rule("text/token_embedding/embedding", f"{t}.embeddings.token_embedding.weight", _same),
           _rule("text/pos_embedding", f"{t}.embeddings.position_embedding.weight", _pos)] +
          _encoder("text", t, model_cfg.text.depth) +
          _ln("text/ln_final", f"{t}.final_layer_norm") +
          ([_rule("txt_proj/kernel", "text_projection.weight", _dense)] if clip else
           _linear("txt_proj", f"{t}.head")))


def rules(target, model_cfg):
  """The full table for a model already accepted by `targets.check_exportable`."""
  v = "vision_model"
  clip = target == "clip"
  out = [_rule("image/patch_embed/kernel", f"{v}.embeddings.patch_embedding.weight", _conv),
         _rule("image/pos_embedding", f"{v}.embeddings.position_embedding.weight", _pos)]
  if clip:
    out += [_rule("image/cls", f"{v}.embeddings.class_embedding", _cls)]
    out += _ln("image/ln_pre", f"{v}.pre_layrnorm")  # sic: transformers' spelling
  else:
    out += [_rule("image/patch_embed/bias", f"{v}.embeddings.patch_embedding.bias", _same)]
  out += _encoder("image", v, model_cfg.image.depth) + _ln("image/ln_post", f"{v}.post_layernorm")
  if clip:
    out += [_rule("img_proj/kernel", "visual_projection.weight", _dense)]
  else:
    h, a = f"{v}.head", "image/map_head/attn"
    out += [_rule("image/map_head/probe", f"{h}.probe", _same),
            _rule([f"{a}/{n}_kernel" for n in ("query", "key", "value")],
                  f"{h}.attention.in_proj_weight", lambda: _packed(_heads_in)),
            _rule([f"{a}/{n}_bias" for n in ("query", "key", "value")],
                  f"{h}.attention.in_proj_bias", lambda: _packed(_flat_bias)),
            _rule(f"{a}/out_kernel", f"{h}.attention.out_proj.weight", _heads_out),
            _rule(f"{a}/out_bias", f"{h}.attention.out_proj.bias", _same)]
    out += (_ln("image/map_head/ln", f"{h}.layernorm") +
            _linear("image/map_head/mlp/fc1", f"{h}.mlp.fc1") +
            _linear("image/map_head/mlp/fc2", f"{h}.mlp.fc2"))
  out += _text(model_cfg, clip)
  out += [_rule("t", "logit_scale", _same if clip else _scalar_1)]
  if not clip:
    out += [_rule("b", "logit_bias", _scalar_1)]
  return out


def to_torch_layout(table, flat):
  """{jax path: array} -> {torch key: array}; every jax path must be used exactly once."""
  used = [p for r in table for p in r.jax]
  unused = sorted(set(flat) - set(used))
  if unused:
    raise ValueError(f"export table has no rule for parameter '{unused[0]}'")
  return {r.torch: np.asarray(r.to_torch([np.asarray(flat[p]) for p in r.jax]), order="C")
          for r in table}


def to_jax_layout(table, tensors, shapes):
  """{torch key: array} + {jax path: shape} -> {jax path: array}; every key must be used."""
  unused = sorted(set(tensors) - {r.torch for r in table})
  if unused:
    raise ValueError(f"import table has no rule for transformers weight '{unused[0]}'")
  out = {}
  for r in table:
    arrays = r.to_jax(np.asarray(tensors[r.torch]), [shapes[p] for p in r.jax])
    for p, a in zip(r.jax, arrays):
      if tuple(a.shape) != tuple(shapes[p]):
        raise ValueError(f"transformers weight '{r.torch}' gives {p} shape {a.shape}, "
                         f"expected {tuple(shapes[p])}")
      out[p] = np.asarray(a, order="C")
  return out

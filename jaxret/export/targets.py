"""Which transformers class a jaxret model maps onto, the options it cannot express, and the
transformers config that describes it (and back).

The target is chosen by the image pooling: a MAP head is SigLIP's (SiglipModel), anything else
is meant as CLIP (CLIPModel). Every option the target cannot hold is listed in one error,
before anything is written.
"""
import math

from jaxret.errors import UserError

# jaxret activation -> transformers `hidden_act` (same function, same approximation).
HF_ACT = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
JAX_ACT = {v: k for k, v in HF_ACT.items()}
JAX_ACT["gelu_new"] = "gelu_tanh"  # the same tanh approximation, spelled the older way


def target_for(model_cfg):
  return "siglip" if model_cfg.image.pool == "map" else "clip"


def check_exportable(model_cfg):
  """-> 'clip' or 'siglip'; raises UserError naming every option the target cannot express."""
  m, i, t = model_cfg, model_cfg.image, model_cfg.text
  target = target_for(m)
  problems = []
  if target == "clip":
    want = "CLIPModel"
    if i.pool != "cls":
      problems.append(f"model.image.pool={i.pool!r} (CLIPModel pools the class token: 'cls')")
    if not i.pre_norm:
      problems.append("model.image.pre_norm=False (CLIPModel always applies ln_pre)")
    if i.patch_bias:
      problems.append("model.image.patch_bias=True (CLIPModel's patch conv has no bias)")
    if not m.image_proj:
      problems.append("model.image_proj=False (CLIPModel always projects the image)")
    if m.text_proj_bias:
      problems.append("model.text_proj_bias=True (CLIPModel's text projection has no bias)")
    if m.init_bias is not None:
      problems.append("model.init_bias is set (CLIPModel has no logit bias)")
    if not t.causal or t.pool != "eos":
      problems.append(f"model.text.causal={t.causal}, pool={t.pool!r} (CLIPModel's text tower "
                      "is causal and pools at the end token: causal=True, pool='eos')")
  else:
    want = "SiglipModel"
    if i.pre_norm:
      problems.append("model.image.pre_norm=True (SiglipModel has no ln_pre)")
    if m.image_proj:
      problems.append("model.image_proj=True (SiglipModel uses the MAP head output directly)")
    if t.causal or t.pool != "last":
      problems.append(f"model.text.causal={t.causal}, pool={t.pool!r} (SiglipModel's text "
                      "tower is bidirectional and pools the last position: causal=False, "
                      "pool='last')")
  if m.act not in HF_ACT:
    problems.append(f"model.act={m.act!r} (no transformers hidden_act for it)")
  if problems:
    raise UserError(f"cannot export as transformers {want}: " + "; ".join(problems))
  return target


def _tower(c, act, eps):
  return dict(hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.depth,
              num_attention_heads=c.num_heads, hidden_act=HF_ACT[act], layer_norm_eps=eps,
              attention_dropout=0.0)


def hf_config(target, model_cfg, *, vocab_size, special_ids, log_scale):
  """-> transformers CLIPConfig / SiglipConfig for a checked model config.

  `special_ids` are the exported tokenizer's {'pad', 'bos', 'eos'} ids; `log_scale` the
  inference-time log temperature (the weights carry it too; the config records it for CLIP).
  """
  import transformers
  m, eps = model_cfg, float(model_cfg.ln_eps)
  text = dict(_tower(m.text, m.act, eps), vocab_size=vocab_size,
              max_position_embeddings=m.text.max_len, pad_token_id=special_ids["pad"],
              bos_token_id=special_ids["bos"], eos_token_id=special_ids["eos"])
  vision = dict(_tower(m.image, m.act, eps), image_size=m.image.size,
                patch_size=m.image.patch_size, num_channels=3)
  if target == "clip":
    text["projection_dim"] = vision["projection_dim"] = m.embed_dim
    return transformers.CLIPConfig(text_config=text, vision_config=vision,
                                   projection_dim=m.embed_dim, logit_scale_init_value=log_scale)
  text["projection_size"] = m.embed_dim
  vision["vision_use_head"] = True
  return transformers.SiglipConfig(text_config=text, vision_config=vision)


def model_updates(target, hf_cfg, log_scale):
  """transformers config -> the jaxret `model` section values that rebuild the same model."""
  tc, vc = hf_cfg.text_config, hf_cfg.vision_config
  acts = {tc.hidden_act, vc.hidden_act}
  if len(acts) != 1 or tc.layer_norm_eps != vc.layer_norm_eps:
    raise UserError("the transformers model uses different activations or LayerNorm eps in its "
                    "two towers; jaxret shares one model.act and model.ln_eps")
  act = acts.pop()
  if act not in JAX_ACT:
    raise UserError(f"transformers hidden_act {act!r} has no jaxret counterpart; valid: "
                    f"{', '.join(sorted(JAX_ACT))}")

  def tower(c):
    return dict(width=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
                mlp_dim=c.intermediate_size)

  clip = target == "clip"
  image = dict(tower(vc), size=vc.image_size, patch_size=vc.patch_size,
               pool="cls" if clip else "map", pre_norm=clip, patch_bias=not clip)
  text = dict(tower(tc), vocab_size=tc.vocab_size, max_len=tc.max_position_embeddings,
              causal=clip, pool="eos" if clip else "last")
  # jaxret caps the scale at max_scale (CLIP: 100); keep the cap unless the weights exceed it.
  max_scale = max(100.0, math.exp(log_scale))
  out = dict(act=JAX_ACT[act], ln_eps=float(tc.layer_norm_eps), image=image, text=text,
             image_proj=clip, text_proj_bias=not clip, max_scale=max_scale,
             init_scale=min(math.exp(log_scale), max_scale))
  if clip:
    out.update(embed_dim=hf_cfg.projection_dim, init_bias=None)
  else:
    out.update(embed_dim=vc.hidden_size, init_bias=-10.0)
  return out

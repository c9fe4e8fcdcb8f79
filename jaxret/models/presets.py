"""Published tower shapes, by name: configs take them from here instead of repeating numbers.

Image towers are ViTs (Dosovitskiy et al.; CLIP's variants in Radford et al. 2021, Table 20).
Text towers are CLIP's causal transformer (77 tokens, BPE vocabulary of 49,408) unless named.
"""

VIT = {
    "B/32": dict(patch_size=32, width=768, depth=12, num_heads=12, mlp_dim=3072),
    "B/16": dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L/14": dict(patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096),
}

CLIP_TEXT = {
    "base": dict(vocab_size=49408, max_len=77, width=512, depth=12, num_heads=8, mlp_dim=2048),
    "large": dict(vocab_size=49408, max_len=77, width=768, depth=12, num_heads=12, mlp_dim=3072),
}


# OpenAI CLIP's pixel statistics (its image processor's image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_towers(c, vit, text, embed_dim):
  """Set `c.model` to CLIP's layout: cls pooling with ln_pre and a bias-free patch embedding,
  OpenAI's pixel statistics, causal text pooled at the end token, quick_gelu, projections
  without bias."""
  c.model.update(embed_dim=embed_dim, image_proj=True, text_proj_bias=False, act="quick_gelu",
                 ln_eps=1e-5, init_scale=1 / 0.07, max_scale=100.0)
  c.model.image.update(size=224, pool="cls", pre_norm=True, patch_bias=False, mean=CLIP_MEAN,
                       std=CLIP_STD, **VIT[vit])
  c.model.text.update(causal=True, pool="eos", **CLIP_TEXT[text])
  return c

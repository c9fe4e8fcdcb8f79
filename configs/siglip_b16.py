"""SigLIP ViT-B/16 at 224px as published (Zhai et al. 2023): MAP-head image tower without a
projection, bidirectional text tower pooled at the last position with a biased head,
sigmoid loss with t' = log 10 and b = -10, context 64. The vocabulary size is the data's
tokenizer's (the paper's is a 32k SentencePiece: `jaxret data train-tokenizer --kind
sentencepiece --vocab-size 32000`, or convert with `--tokenizer` pointing at one); pin it with
--config.model.text.vocab_size=32000 to have a different tokenizer refused.

  jaxret train --config configs/siglip_b16.py --workdir gs://BUCKET/siglip_b16 \
      --config.data.dir=/path/to/converted/records

The batch and schedule follow the paper's 32k batch; set total_steps for your data budget.
"""
from jaxret.config import defaults
from jaxret.models.presets import VIT


def get_config(arg=None):
  del arg
  c = defaults()
  c.batch_size = 32768
  c.total_steps = 100_000
  c.log_every = 50
  c.eval_every = 5000
  c.checkpoint.update(every=1000, keep=3)

  c.model.update(embed_dim=768, image_proj=False, text_proj_bias=True, init_scale=10.0,
                 init_bias=-10.0, act="gelu_tanh", ln_eps=1e-6)
  c.model.image.update(size=224, pool="map", pre_norm=False, patch_bias=True, **VIT["B/16"])
  c.model.text.update(vocab_size=0, max_len=64, width=768, depth=12, num_heads=12,
                      mlp_dim=3072, causal=False, pool="last")
  c.loss.name = "sigmoid"
  # SigLIP: Adam(W) with beta2 = 0.95 for stability at large batch, lr 1e-3, wd 1e-4.
  c.optim.update(lr=1e-3, warmup_steps=10_000, weight_decay=1e-4, b1=0.9, b2=0.95, eps=1e-8,
                 grad_clip_norm=1.0)
  c.data.dir = "data/webli"
  return c

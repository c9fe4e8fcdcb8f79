"""FILIP (Yao et al. 2021): CLIP-style towers projected to a shared 256-dim space, token-wise
late-interaction loss keeping each example's top 25% of tokens, texts sent in half precision,
LAMB optimiser; the argument picks the variant (data.dir is local: a converted folder, or a bucket mounted with
gcsfuse, as the TPU launcher does with DATA_BUCKET=BUCKET at /mnt/data):

  jaxret train --config configs/filip.py:b32 --workdir gs://BUCKET/filip_b32 \
      --config.data.dir=/mnt/data/records
  jaxret train --config configs/filip.py:l14 --workdir gs://BUCKET/filip_l14 ...

b32: ViT-B/32 image tower, 12-layer causal text tower 512 wide. l14: ViT-L/14, text 768 wide.
The architecture and the efficiency settings are the paper's (§3.1, §3.1.2). Its optimiser
numbers (Tables 8-9) could not be checked where this file was written: lr, weight decay and
warmup below are starting values to verify against the paper before a full run.
"""
from jaxret.config import defaults
from jaxret.models.presets import clip_towers

VARIANTS = {"b32": ("B/32", "base"), "l14": ("L/14", "large")}


def get_config(variant="b32"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown FILIP variant {variant!r}; valid: {', '.join(VARIANTS)}")
  vit, text = VARIANTS[variant]
  c = clip_towers(defaults(), vit, text, embed_dim=256)
  # The vocabulary is the data's tokenizer's (OpenAI's BPE: 49,408); pin it with
  # --config.model.text.vocab_size=49408 to have a different tokenizer refused.
  c.model.text.vocab_size = 0
  c.model.update(dtype="bfloat16", remat="dots_no_batch", scan=True)
  c.batch_size = 10240
  c.total_steps = 300_000
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint.update(every=2000, keep=3)
  c.loss.update(name="filip", impl="ring", filip_token_fraction=0.25,
                filip_comm_dtype="float16", filip_special_tokens=True)
  c.optim.update(name="lamb", lr=8e-4, warmup_steps=5000, weight_decay=3e-3, b1=0.9,
                 b2=0.999, eps=1e-6, grad_clip_norm=0.0)
  c.data.dir = "data/filip"
  return c

"""CLIP (Radford et al. 2021) with the published shapes and training recipe; the argument
picks the variant (data.dir is local: a converted folder, or a bucket mounted with
gcsfuse, as the TPU launcher does with DATA_BUCKET=BUCKET at /mnt/data):

  jaxret train --config configs/clip.py:b32 --workdir gs://BUCKET/clip_b32 \
      --config.data.dir=/mnt/data/records
  jaxret train --config configs/clip.py:b16 --workdir gs://BUCKET/clip_b16 ...
  jaxret train --config configs/clip.py:l14 --workdir gs://BUCKET/clip_l14 ...
  # on a TPU slice, with launch/tpu_pod.sh (v4-256: 128 chips of 32 GiB; at 256 examples
  # per chip, full remat and FSDP over 8 plan 22 GiB per chip, the default remat 81 GiB):
  REPO=https://example.com/you/jaxret.git DATA_BUCKET=BUCKET \
  launch/tpu_pod.sh my-slice us-central2-b v4-256 -- \
      train --config configs/clip.py:l14 --workdir gs://BUCKET/clip_l14 \
      --config.data.dir=/mnt/data/records --config.model.remat=full --config.mesh.fsdp=8

Image towers from the paper's Table 20 (ViT-B/32, B/16, L/14 at 224px); text: 12 layers,
77 tokens, 512 wide with 8 heads (B) or 768 wide with 12 heads (L); embeddings 512 (B) or
768 (L). Softmax loss, temperature initialised at 1/0.07 and capped at 100. Adam(W) with
beta2 = 0.98, eps 1e-6 and weight decay 0.2; lr 5e-4 (B) or 4e-4 (L); 2,000 warmup steps;
batch 32,768 for 32 epochs of 400M pairs (about 390k steps); mixed precision.
"""
from jaxret.config import defaults
from jaxret.models.presets import clip_towers

VARIANTS = {  # vit, text tower, embedding dim, peak lr
    "b32": ("B/32", "base", 512, 5e-4),
    "b16": ("B/16", "base", 512, 5e-4),
    "l14": ("L/14", "large", 768, 4e-4),
}


def get_config(variant="b16"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown CLIP variant {variant!r}; valid: {', '.join(VARIANTS)}")
  vit, text, embed_dim, lr = VARIANTS[variant]
  c = clip_towers(defaults(), vit, text, embed_dim)
  # The vocabulary is the data's tokenizer's (OpenAI's BPE: 49,408); pin it with
  # --config.model.text.vocab_size=49408 to have a different tokenizer refused.
  c.model.text.vocab_size = 0
  c.model.update(dtype="bfloat16", remat="dots_no_batch", scan=True)
  c.batch_size = 32768
  c.total_steps = 390_000
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint.update(every=2000, keep=3)
  c.loss.name = "softmax"
  c.optim.update(name="adamw", lr=lr, warmup_steps=2000, weight_decay=0.2, b1=0.9, b2=0.98,
                 eps=1e-6, grad_clip_norm=0.0)
  c.data.dir = "data/clip"
  return c

"""CLIP ViT-B/32 (Radford et al. 2021) with its published shapes and training recipe:
image width/depth/heads from Table 20, text 512 wide, 8 heads, 12 layers, 77 tokens, embedding 512,
softmax loss with the temperature initialised at 1/0.07 and capped at 100, Adam(W)
beta2 = 0.98, eps 1e-6, weight decay 0.2, lr 5e-4, 2,000 warmup steps, batch 32,768 for 32 epochs
of 400M pairs (about 390k steps), mixed precision.

  jaxret train --config configs/clip_b32.py --workdir gs://BUCKET/clip_b32 \
      --config.data.dir=gs://BUCKET/records
  # on a TPU slice: launch/tpu_pod.sh NAME ZONE v4-256 -- train --config configs/clip_b32.py ...
"""
from jaxret.config import defaults
from jaxret.models.presets import clip_towers


def get_config(arg=None):
  del arg
  c = clip_towers(defaults(), "B/32", "base", embed_dim=512)
  c.model.update(dtype="bfloat16", remat="dots_no_batch", scan=True)
  c.batch_size = 32768
  c.total_steps = 390_000
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint.update(every=2000, keep=3)
  c.loss.name = "softmax"
  c.optim.update(name="adamw", lr=5e-4, warmup_steps=2000, weight_decay=0.2, b1=0.9, b2=0.98,
                 eps=1e-6, grad_clip_norm=0.0)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.data.dir = "data/clip"
  return c

"""Demo: a small dual encoder on the embedded demo data (64x64 scenes of two tinted items).

Build the data once, then train and evaluate a variant (the loss is named after the colon):

  jaxret data demo --out demo_data
  jaxret train --config configs/demo.py:softmax --workdir runs/demo-softmax
  jaxret train --config configs/demo.py:sigmoid --workdir runs/demo-sigmoid
  jaxret train --config configs/demo.py:siglip  --workdir runs/demo-siglip
  jaxret train --config configs/demo.py:filip   --workdir runs/demo-filip
  jaxret train --config configs/demo.py:triplet --workdir runs/demo-triplet
  jaxret train --config configs/demo.py:negclip --workdir runs/demo-negclip

Distillation (loss.distill): `:teacher` trains a wider, deeper softmax model for longer
(width 192, 4 + 3 layers, 1,000 steps); `:distill` is the softmax student with that teacher
(default runs/demo-teacher) in its train step. Offline, the teacher's embeddings of 4 views of
every training image are stored first and read in training:

  jaxret train --config configs/demo.py:teacher --workdir runs/demo-teacher
  jaxret train --config configs/demo.py:distill --workdir runs/demo-distill
  jaxret data teacher --teacher runs/demo-teacher --data demo_data --out demo_data_taught
  jaxret train --config configs/demo.py:distill --workdir runs/demo-distill-offline \
      --config.data.dir=demo_data_taught --config.loss.distill.source=offline

negclip is the softmax run with hard negatives (NegCLIP): 6 swapped captions per example (two
attribute, two object and two relation swaps, from the scene metadata, phrased like the
caption) join each image's softmax as columns that are never positive
(`data.hard_negatives=6`). `make demo LOSSES="softmax
negclip"` runs and compares any of these variants (`LOSSES="teacher distill"`: the teacher
first).

Overrides go after the config, e.g. `--config.batch_size=64 --config.total_steps=200`.
softmax, sigmoid, filip and triplet (VSE++'s hinge loss, margin 0.2, summed over all negatives:
see below) use the same CLIP-style towers (cls pooling, causal text pooled at the end token), so
their table compares the losses alone; sigmoid adds SigLIP's learnt bias (t' = log 10, b = -10).
siglip is the sigmoid loss on SigLIP-style towers (MAP head and no image projection,
bidirectional text pooled at the last position with a biased head), exportable as transformers'
SiglipModel (CLIPModel has no logit bias, so `jaxret export` refuses a sigmoid run).
"""
from jaxret.config import defaults


def get_config(variant="softmax"):
  loss = {"negclip": "softmax", "teacher": "softmax", "distill": "softmax",
          "siglip": "sigmoid"}.get(variant, variant)
  c = defaults()
  c.data.dir = "demo_data"
  c.batch_size = 128
  c.total_steps = 600
  c.log_every = 20
  c.checkpoint.every = 100
  c.checkpoint.keep = 2

  c.model.embed_dim = 128
  c.model.image.update(size=64, patch_size=16, width=128, depth=3, num_heads=4, mlp_dim=384)
  c.model.text.update(max_len=20, width=128, depth=2, num_heads=4, mlp_dim=384)

  c.optim.update(lr=1e-3, warmup_steps=60, weight_decay=0.05, b2=0.98)
  # open_clip's crop (area 90-100%, aspect 3/4-4/3) keeps both items of a 2x2 scene in view;
  # no flip: captions say "left" and "right".
  c.data.augment.update(enabled=True, crop_scale=(0.9, 1.0), flip=False)

  c.loss.name = loss
  # The demo's test split holds unseen combinations of items, colours and positions: the
  # compositional task (true caption vs its attribute/object/relation swaps) shows whether a
  # loss reads captions as more than bags of words.
  c.eval.tasks = ("retrieval", "hubness", "zeroshot", "compositional")
  # The demo's 17 image and 20 text tokens are few: FILIP scores all of them (the paper's 25%
  # selection is for hundreds of tokens per example).
  c.loss.filip_token_fraction = 1.0
  if variant == "teacher":
    c.total_steps = 1000
    c.model.embed_dim = 192
    c.model.image.update(width=192, depth=4, num_heads=6, mlp_dim=576)
    c.model.text.update(width=192, depth=3, num_heads=6, mlp_dim=576)
  if variant == "distill":
    c.loss.distill.teacher = "runs/demo-teacher"
  if variant == "negclip":
    # Two of each swap type (transforms.HardNegatives takes turns). Measured at 600 steps: 6
    # gave i2t R@1 49.2% and relation 54.9% against 48.2% and 52.0% with 3 (softmax: 47.0%,
    # 50.6%), for about twice the step time.
    c.data.hard_negatives = 6
  if loss == "triplet":
    # From random weights the hardest-negative form sits at its 2 x margin plateau (measured:
    # loss 0.40 and chance retrieval after 150 steps, as VSE++ reports without pretraining);
    # the sum over all negatives learns (i2t R@1 24% after 150 steps).
    c.loss.triplet_max_violation = False
  if loss == "sigmoid":
    # SigLIP's published t' = log 10, b = -10. On the CLIP towers (measured, 600 steps) t' = log
    # (1/0.07), b = -log(128) or a 10x learning rate on t and b move i2t R@1 by at most a point
    # (from 38.7%); SigLIP's towers cost 11-13 points under either loss (sigmoid 38.7 -> 27.5%,
    # softmax 47.0 -> 33.6%).
    c.model.update(init_scale=10.0, init_bias=-10.0)
  if variant == "siglip":
    # SigLIP's towers: no image projection (the MAP head output is the embedding), a biased
    # text head; exportable as transformers' SiglipModel.
    c.model.update(image_proj=False, text_proj_bias=True)
    c.model.image.pool = "map"
    c.model.image.pre_norm = False
    c.model.image.patch_bias = True
    c.model.text.update(causal=False, pool="last")
  return c

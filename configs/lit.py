"""LiT (Zhai et al. 2022, locked-image text tuning): start from an imported model, lock its image
side and train the text tower (and the temperature) on your captions.

  jaxret import-hf HF_DIR --out IMPORTED --tokenizer DATA/tokenizer.json
  jaxret train --config configs/lit.py --workdir runs/lit --config.model.init_from=IMPORTED \
      --config.data.dir=DATA

HF_DIR is a transformers CLIPModel or SiglipModel folder (`jaxret export` writes one);
`--tokenizer` orders the imported token table by the data's token ids. The model section must
describe the imported model: it is configs/demo.py:softmax's (what `jaxret export` of a demo run
gives); for another model set its keys from IMPORTED/model.json (`--config.model.image.width=...`).
model.image.size and model.text.max_len may differ from the import: position embeddings are
resampled (README, "Parameter rules").

Every parameter is loaded from IMPORTED (`load` defaults to true); the rule below freezes the
image tower and its projection into the shared space (`img_proj`): LiT locks the image
embedding itself, so the text tower learns to read it. Frozen parameters hold no optimizer state
and their backward pass is not computed.
"""
import os

from jaxret import config

# Left at this value, training fails at once with a line saying which key to pass.
REQUIRED = "REQUIRED: pass --config.model.init_from=IMPORTED (a `jaxret import-hf` folder)"


def get_config(arg=""):
  del arg
  c = config.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py:softmax"))
  c.model.init_from = REQUIRED
  c.optim.rules = ((r"image/.*|img_proj/.*", {"frozen": True}),)
  return c

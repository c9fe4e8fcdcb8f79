"""Hand a jaxret model to PyTorch (transformers CLIPModel / SiglipModel) and take one back.

  targets.py    which transformers class a model config maps onto, and what it refuses
  convert.py    the one table of parameter rules (jaxret path <-> torch key), both directions
  processor.py  the exported tokenizer and image processor (jaxret's eval transform)
  hf.py         export: params -> a transformers folder; a workdir's checkpoint -> the same
  hf_import.py  import: a transformers folder -> jaxret params, model config and checkpoint
"""

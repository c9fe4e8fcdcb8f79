"""Using a trained model without the trainer: `jaxret.load(path)`, `jaxret embed`,
`jaxret search`.

  loaders.py        load(path): a workdir, an exported transformers folder or an import-hf folder
  model.py          Model: encode_images / encode_texts / similarity on a data-parallel mesh
  images.py         what encode_images accepts (PIL, arrays, paths) -> the evaluation view
  store.py          the embedding store: float16 shards + ids, resumable (`jaxret embed`)
  search.py         exact sharded top-k over a store, FILIP rerank (`jaxret search`)
  contact_sheet.py  the query beside its top-k images, as one PNG (`--show`)
"""
from jaxret.inference.loaders import load
from jaxret.inference.model import Model

__all__ = ["load", "Model"]

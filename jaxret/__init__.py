"""jaxret: contrastive image-text pretraining (CLIP, SigLIP, FILIP) in JAX/Flax."""

__version__ = "0.1.0"


def load(path, step=None, **kwargs):
  """A trained model, ready to embed: `jaxret.load(path).encode_images(...)`.

  `path` is a workdir, a `jaxret export` folder or a `jaxret import-hf` folder; see
  jaxret.inference.loaders. Imported here on first use, so `import jaxret` stays cheap.
  """
  from jaxret.inference.loaders import load as load_model
  return load_model(path, step, **kwargs)

"""jaxret: contrastive image-text pretraining (CLIP, SigLIP, FILIP) in JAX/Flax."""

__version__ = "0.1.0"

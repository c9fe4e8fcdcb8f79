"""jaxret: contrastive image-text pretraining (CLIP, SigLIP, FILIP) in JAX/Flax."""
from jaxret import cpu_malloc

# First, before JAX starts its threads: see cpu_malloc's docstring.
cpu_malloc.configure()

__version__ = "0.1.0"

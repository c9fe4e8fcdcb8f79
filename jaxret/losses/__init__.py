"""Contrastive losses: a plain full-batch reference and a sharded kernel for each.

softmax (CLIP), sigmoid (SigLIP), filip (FILIP late interaction), triplet (VSE++ hinge);
`get_loss(name)` maps a config name to a `Loss`.
"""

from jaxret.losses.filip import filip_loss, filip_reference, filip_scores
from jaxret.losses.registry import LOSS_NAMES, Loss, get_loss
from jaxret.losses.sigmoid import sigmoid_loss, sigmoid_reference
from jaxret.losses.softmax import softmax_loss, softmax_reference
from jaxret.losses.triplet import triplet_loss, triplet_reference

__all__ = [
    "LOSS_NAMES", "Loss", "get_loss",
    "softmax_loss", "softmax_reference",
    "sigmoid_loss", "sigmoid_reference",
    "filip_loss", "filip_reference", "filip_scores",
    "triplet_loss", "triplet_reference",
]

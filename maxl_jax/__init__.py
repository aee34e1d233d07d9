"""maxl_jax: Meta AuXiliary Learning (MAXL) in JAX/Flax.

The math lives in small pure modules (``hierarchy``, ``losses``, ``meta``, ``maxl``); networks in
``models``; pure steps in ``steps``; devices, data, checkpoints and the loop at the edges
(``parallel``, ``data``, ``checkpoint``, ``train``).
"""

from maxl_jax.hierarchy import validate_psi
from maxl_jax.losses import entropy_term, focal_loss, mask_log_softmax, mask_softmax
from maxl_jax.maxl import generate_labels, meta_gradient, multitask_loss
from maxl_jax.meta import unrolled_update
from maxl_jax.models import make_networks
from maxl_jax.steps import Maxl, reference_optimizers
from maxl_jax.train_state import TrainState

__version__ = "0.1.0"

__all__ = [
    "Maxl", "TrainState", "entropy_term", "focal_loss", "generate_labels", "make_networks",
    "mask_log_softmax", "mask_softmax", "meta_gradient", "multitask_loss", "reference_optimizers",
    "unrolled_update", "validate_psi",
]

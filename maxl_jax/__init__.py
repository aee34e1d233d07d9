"""maxl_jax: auxiliary learning in JAX/Flax, from MAXL (Meta AuXiliary Learning) on.

The math lives in small pure modules (``hierarchy``, ``losses``, ``meta``, ``maxl``); networks in
``models``; each method's pure steps in ``methods`` (one module per method, found by name);
devices, data, checkpoints and the loop at the edges (``parallel``, ``data``, ``checkpoint``,
``train``).
"""

from maxl_jax.hierarchy import validate_psi
from maxl_jax.losses import entropy_term, focal_loss, mask_log_softmax, mask_softmax
from maxl_jax.maxl import generate_labels, generator_meta_gradient, meta_gradient, multitask_loss
from maxl_jax.meta import implicit_gradient, unrolled_update
from maxl_jax.models import make_networks
from maxl_jax.steps import reference_optimizers
from maxl_jax.train_state import TrainState
from maxl_jax import methods  # noqa: E402  (after the modules the methods import)
from maxl_jax.methods.maxl import Maxl

__version__ = "0.1.0"

__all__ = [
    "Maxl", "TrainState", "entropy_term", "focal_loss", "generate_labels",
    "generator_meta_gradient", "implicit_gradient",
    "make_networks", "mask_log_softmax", "mask_softmax", "meta_gradient", "methods",
    "multitask_loss", "reference_optimizers", "unrolled_update", "validate_psi",
]

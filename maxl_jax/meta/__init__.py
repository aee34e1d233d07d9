"""Gradient estimators: how to differentiate an outer loss through the training of ``params``.

All share one shape: an inner loss ``L_in(params, hyper)``, an outer loss ``L_out(params, hyper)``,
and a ``MetaGradient`` result (``grad_hyper`` has the structure of ``hyper``). One file each:

* ``unroll``: the exact unroll, ``d/dhyper L_out(params_plus(hyper), hyper)`` through ``k`` optax
  updates (``meta_gradient``: reverse, or forward-over-reverse for ``k = 1``).
* ``finite_difference``: MAXL's first-order form, the mixed second derivative of the one-step unroll
  replaced by a central difference of first derivatives (``finite_difference_meta_gradient``, or
  ``meta_gradient(..., form="finite_difference")``).
* ``implicit``: the IFT hypergradient at the current ``params`` treated as the inner optimum, with a
  truncated Neumann series or conjugate gradient through Hessian-vector products
  (``implicit_gradient``).
"""

from maxl_jax.meta.finite_difference import REFERENCE_RADIUS, finite_difference_meta_gradient
from maxl_jax.meta.implicit import SOLVERS, cg_inverse, implicit_gradient, neumann_inverse
from maxl_jax.meta.unroll import (FORMS, LossFn, MetaGradient, meta_gradient,
                                  one_step_meta_gradient, unrolled_update)

__all__ = [
    "FORMS", "LossFn", "MetaGradient", "REFERENCE_RADIUS", "SOLVERS", "cg_inverse",
    "finite_difference_meta_gradient", "implicit_gradient", "meta_gradient", "neumann_inverse",
    "one_step_meta_gradient", "unrolled_update",
]

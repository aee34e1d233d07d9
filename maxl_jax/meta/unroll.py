"""The exact unroll: gradients through optax updates, the estimator behind MAXL's meta step.

Given an inner loss ``L_in(params, hyper)`` and an outer loss ``L_out(params, hyper)``,

    params_plus(hyper) = k optax steps of ``optimizer`` on ``L_in(., hyper)`` from ``params``
    meta_gradient      = d/d hyper  L_out(params_plus(hyper), hyper)

differentiated exactly (second order). For MAXL ``params`` is theta1, ``hyper`` is the generator's
soft labels (chain the result through the generator with ``jax.vjp`` to reach theta2), ``L_in`` is
``L_pri + L_aux`` and ``L_out`` is ``L_pri + lambda * H``.

Two forms, equal up to float rounding:

* ``"reverse"``: reverse-over-reverse; ``jax.grad`` of the whole unrolled update (any ``k``).
* ``"forward_over_reverse"`` (``k = 1``): ``dL_out/dhyper = dL_out/dhyper|direct + (d g/d hyper)^T w``
  with ``g = grad_params L_in`` and ``w = (dU/dg)^T grad L_out(params_plus)`` (a VJP through the
  optimizer's update ``U``); the mixed second derivative ``(d g / d hyper)^T w`` is the JVP, along
  ``w`` in ``params``, of ``grad_hyper L_in`` (forward-over-reverse, no finite differences).
"""

from __future__ import annotations

import jax
import optax

from maxl_jax import conv
from maxl_jax.meta import finite_difference
from maxl_jax.meta.core import (LossFn, MetaGradient, PyTree, check_loss_contract,  # noqa: F401
                                one_step_meta_gradient, unrolled_update)

FORMS = ("reverse", "forward_over_reverse", "finite_difference")


def meta_gradient(inner_loss: LossFn, outer_loss: LossFn, params: PyTree, hyper: PyTree,
                  optimizer: optax.GradientTransformation, *, steps: int = 1,
                  form: str = "reverse") -> MetaGradient:
    """Exact gradient w.r.t. ``hyper`` of ``outer_loss(params_plus(hyper), hyper)``.

    Args:
      inner_loss: ``(params, hyper) -> (loss, aux)``, the loss the inner optimizer descends.
      outer_loss: ``(params_plus, hyper) -> (loss, aux)``, evaluated after the inner steps.
      params: the inner parameters (theta1).
      hyper: what the gradient is taken with respect to.
      optimizer: any optax ``GradientTransformation``; its state starts fresh (``optimizer.init``).
        When it is Adam, use ``eps_root > 0``: with ``eps_root=0`` the meta-gradient is NaN wherever
        an inner gradient is exactly zero.
      steps: number of inner steps ``k``.
      form: ``"reverse"``, ``"forward_over_reverse"`` (``k = 1`` only), or
        ``"finite_difference"`` (``k = 1``; the first-order approximation of
        ``maxl_jax.meta.finite_difference``, not exact).
    """
    if form not in FORMS:
        raise ValueError(f"unknown meta-gradient form {form!r}; choose one of {FORMS}")
    check_loss_contract(inner_loss, params, hyper, "inner_loss")
    check_loss_contract(outer_loss, params, hyper, "outer_loss")
    if form == "reverse":
        return _reverse(inner_loss, outer_loss, params, hyper, optimizer, steps)
    if steps != 1:
        raise ValueError(f"form={form!r} supports steps=1 only (got {steps}); "
                         "use form='reverse' for several inner steps")
    if form == "finite_difference":
        return finite_difference.finite_difference_meta_gradient(inner_loss, outer_loss, params,
                                                                 hyper, optimizer)
    return _forward_over_reverse(inner_loss, outer_loss, params, hyper, optimizer)


def _reverse(inner_loss, outer_loss, params, hyper, optimizer, steps):
    def objective(h):
        params_plus, in_loss, in_aux = unrolled_update(lambda p: inner_loss(p, h), params,
                                                       optimizer, steps)
        out_loss, out_aux = outer_loss(params_plus, h)
        return out_loss, (params_plus, in_loss, in_aux, out_aux)

    (out_loss, (params_plus, in_loss, in_aux, out_aux)), grad = jax.value_and_grad(
        objective, has_aux=True)(hyper)
    return MetaGradient(out_loss, grad, params_plus, in_loss, in_aux, out_aux)


def _forward_over_reverse(inner_loss, outer_loss, params, hyper, optimizer):
    def jvp_mixed_term(grad_hyper_at, w):
        return jax.jvp(grad_hyper_at, (params,), (w,))[1]

    # jax.jvp through our CPU convolutions needs their forward-mode-capable form (conv.forward_mode)
    with conv.forward_mode():
        return one_step_meta_gradient(inner_loss, outer_loss, params, hyper, optimizer,
                                      jvp_mixed_term)

"""What the estimators share: the loss contract, the result, the inner update, and the one-step
meta-gradient assembled from a supplied mixed term (``unroll``'s forward-over-reverse form and
``finite_difference`` each supply theirs). Imports nothing of ``maxl_jax``: the estimator modules
import it, and ``unroll`` (which dispatches ``form="finite_difference"``) imports
``finite_difference``, so imports point one way: unroll -> finite_difference -> core.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

PyTree = Any
# loss(params, hyper) -> (scalar loss, aux pytree)
LossFn = Callable[[PyTree, PyTree], tuple[jax.Array, PyTree]]


class MetaGradient(NamedTuple):
    """Result of ``meta_gradient``.

    Attributes:
      outer_loss: ``L_out(params_plus, hyper)``.
      grad_hyper: its exact gradient w.r.t. ``hyper`` (same structure as ``hyper``).
      params_plus: the parameters after the inner steps.
      inner_loss: ``L_in(params, hyper)`` at the first inner step.
      inner_aux: the aux output of the first inner step (e.g. updated BatchNorm statistics).
      outer_aux: the aux output of the outer loss.
    """

    outer_loss: jax.Array
    grad_hyper: PyTree
    params_plus: PyTree
    inner_loss: jax.Array
    inner_aux: PyTree
    outer_aux: PyTree


def unrolled_update(loss_fn: Callable[[PyTree], tuple[jax.Array, PyTree]], params: PyTree,
                    optimizer: optax.GradientTransformation, steps: int = 1):
    """``steps`` optax updates of ``params`` on ``loss_fn`` from a fresh optimizer state.

    Differentiable end to end. Returns ``(params_plus, first_loss, first_aux)``.
    """
    if steps < 1:
        raise ValueError(f"inner steps must be >= 1, got {steps}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    opt_state = optimizer.init(params)
    first = None
    for _ in range(steps):
        (loss, aux), grads = grad_fn(params)
        if first is None:
            first = (loss, aux)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, first[0], first[1]


def check_loss_contract(loss: LossFn, params: PyTree, hyper: PyTree, name: str) -> None:
    """Raises ``TypeError`` unless ``loss(params, hyper)`` returns ``(scalar, aux)`` (checked on
    shapes alone with ``jax.eval_shape``: nothing is computed)."""
    out = jax.eval_shape(loss, params, hyper)
    ok = (isinstance(out, tuple) and len(out) == 2 and hasattr(out[0], "shape")
          and out[0].shape == ())
    if not ok:
        got = (f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else
               f"shape {out.shape}" if hasattr(out, "shape") else type(out).__name__)
        hint = (" Return `(loss, None)` if it has nothing else to report."
                if hasattr(out, "shape") and out.shape == () else "")
        raise TypeError(f"{name}(params, hyper) must return (scalar loss, aux pytree); it "
                        f"returned {got}.{hint}")


def one_step_meta_gradient(inner_loss: LossFn, outer_loss: LossFn, params: PyTree, hyper: PyTree,
                           optimizer: optax.GradientTransformation,
                           mixed_term: Callable[[Callable[[PyTree], PyTree], PyTree], PyTree]
                           ) -> MetaGradient:
    """The one-step meta-gradient assembled from its two parts, with the mixed term supplied.

    ``params_plus = params + U(g)``, ``g = grad_params L_in(params, hyper)``, ``U`` the optimizer's
    update from a fresh state; ``w = (dU/dg)^T grad L_out(params_plus)`` by a VJP through ``U``. Then
    ``dL_out/dhyper = dL_out/dhyper|direct + mixed_term(grad_hyper_at, w)`` where
    ``grad_hyper_at(p) = grad_hyper L_in(p, hyper)`` and ``mixed_term`` returns (an estimate of) its
    derivative along ``w``: ``(d grad_params L_in / d hyper)^T w``.
    """
    (in_loss, in_aux), g = jax.value_and_grad(inner_loss, has_aux=True)(params, hyper)
    opt_state = optimizer.init(params)

    def update(grads):
        updates, _ = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates)

    params_plus, update_vjp = jax.vjp(update, g)
    (out_loss, out_aux), (d_params_plus, d_hyper) = jax.value_and_grad(
        outer_loss, argnums=(0, 1), has_aux=True)(params_plus, hyper)
    # Materialise grad L_out(theta+) before it feeds the mixed term: without this barrier, XLA:CPU
    # (jaxlib 0.10.2, every optimisation level) miscompiled the forward-over-reverse meta-gradient
    # of the small CNN at width 16-32, batch 100, into inf/NaN, while the same jaxpr evaluated op by
    # op was right (tests/test_maxl.py checks that size).
    d_params_plus = jax.lax.optimization_barrier(d_params_plus)
    (w,) = update_vjp(d_params_plus)

    def grad_hyper_at(p):
        return jax.grad(lambda p_, h: inner_loss(p_, h)[0], argnums=1)(p, hyper)

    mixed = mixed_term(grad_hyper_at, w)
    grad = jax.tree_util.tree_map(lambda a, b: a + b, d_hyper, mixed)
    return MetaGradient(out_loss, grad, params_plus, in_loss, in_aux, out_aux)

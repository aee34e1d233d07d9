"""The implicit (IFT) hypergradient: AuxiLearn, MAOAL, JTDS, AuxiNash, DTG-AuxL.

The bi-level problem ``min_h L_out(theta*(h), h)``, ``theta*(h) = argmin_theta L_in(theta, h)``. At an
inner stationary point, ``G(theta*(h), h) = 0`` with ``G = grad_theta L_in``, the implicit function
theorem gives

    dL_out/dh = dL_out/dh|direct - (d G / d h)^T q,     q = H^-T grad_theta L_out,  H = dG/dtheta

(``H`` is the Hessian of ``L_in``, symmetric; the transpose matters only for a ``grad_map`` that is
not a gradient, e.g. MAOAL's importance-weighted gradient). The current ``theta`` is treated as the
inner optimum. ``q`` is never formed from ``H`` itself, only from vector products ``H^T u`` (one
linearisation of ``G``, reused), by one of two solvers:

* ``"neumann"``: the truncated Neumann series ``H^-1 v ~= alpha sum_{j=0..J} (I - alpha H)^j v``,
  ``J = terms``. It converges as ``J -> oo`` iff the spectral radius of ``I - alpha H`` is < 1
  (for a symmetric ``H``: ``H`` positive definite and ``0 < alpha < 2 / lambda_max(H)``); on an
  eigenvector of ``H`` with eigenvalue ``lambda`` it multiplies by
  ``(1 - (1 - alpha lambda)^(J+1)) / lambda``, which for small ``J alpha |lambda|`` is
  ``~ alpha (J + 1)``, whatever ``lambda``. AuxiLearn's and
  MAOAL's code leave the leading ``alpha`` out: with ``scale_by_alpha=False`` (the default, theirs)
  the implicit term ``(dG/dh)^T q`` is ``1 / alpha`` times the IFT's, the direct term
  ``dL_out/dh|direct`` is not divided; ``scale_by_alpha=True`` gives the IFT value itself.
* ``"cg"``: ``terms`` iterations of conjugate gradient on ``H q = v`` (``H`` symmetric positive
  definite; with ``terms`` >= the number of parameters it is exact up to rounding).

``damping = lambda >= 0`` (default 0, the authors') replaces ``H`` by ``H + lambda I`` in either
solver:

    q_lambda = (H + lambda I)^-T grad_theta L_out,

the exact IFT hypergradient of the proximal inner problem
``theta*_lambda(h) = argmin_theta L_in(theta, h) + lambda/2 ||theta - theta_0||^2`` (``theta_0`` the
current ``theta``; iMAML's regularised inner problem), whose Hessian is ``H + lambda I``. Away from
a strict local minimum ``H`` is indefinite and numerically singular (the small CNN after 200 steps:
~45% negative eigenvalues, condition number ~1e20), so ``H^-1 v`` itself is no target an estimator
can converge to, and the undamped Neumann series diverges (spectral radius
``>= 1 + alpha |lambda_min| > 1``). With ``lambda > -lambda_min(H)`` the system is positive
definite: CG converges to ``q_lambda`` in ``O(sqrt(kappa))`` iterations,
``kappa = (lambda_max + lambda) / (lambda_min + lambda)``, the Neumann series (with
``alpha < 2 / (lambda_max + lambda)``) in ``O(kappa)`` terms. On the small CNN,
``solver="cg", terms=30, damping=-lambda_min + 0.01 lambda_max`` reaches ``q_lambda`` to 2e-7..6e-4
relative error (AuxiLearn, MAOAL, DTG), where 30 damped Neumann terms leave 1-100%, and the
authors' undamped ``J = 3`` is not an approximation of any ``q_lambda`` (MAOAL, ``alpha = 1``:
``10^4`` times too large; ``benchmarks/implicit_hypergradients.py``). ``q_lambda`` itself depends
on ``lambda`` there (the choice of ``lambda`` is a modelling choice, not only a numerical one).
``extreme_eigenvalues`` (Lanczos, matrix-free) estimates ``lambda_min`` and ``lambda_max`` to set
``damping`` and ``alpha``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.flatten_util
import jax.numpy as jnp

from maxl_jax.meta.core import LossFn, MetaGradient, PyTree

SOLVERS = ("neumann", "cg")

# grad_map(params, hyper) -> (G, aux): the map whose zero defines the inner optimum.
GradMap = Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]


def _tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                              jax.tree_util.tree_leaves(b)))


def neumann_inverse(product: Callable[[PyTree], PyTree], v: PyTree, *, terms: int, alpha,
                    scale_by_alpha: bool = False) -> PyTree:
    """``c * sum_{j=0..terms} (I - alpha A)^j v`` with ``c = alpha`` if ``scale_by_alpha`` else 1.

    ``product(u) = A u``. With ``scale_by_alpha`` this approximates ``A^-1 v`` (when the spectral
    radius of ``I - alpha A`` is < 1); without it, ``A^-1 v / alpha`` (AuxiLearn's and MAOAL's
    convention).
    """
    def body(_, carry):
        term, total = carry
        au = product(term)
        term = jax.tree_util.tree_map(lambda t, a: t - alpha * a, term, au)
        return term, jax.tree_util.tree_map(jnp.add, total, term)

    _, total = jax.lax.fori_loop(0, terms, body, (v, v))
    if scale_by_alpha:
        total = jax.tree_util.tree_map(lambda t: alpha * t, total)
    return total


def cg_inverse(product: Callable[[PyTree], PyTree], v: PyTree, *, terms: int) -> PyTree:
    """``terms`` iterations of conjugate gradient on ``A q = v`` from ``q = 0`` (``A`` symmetric
    positive definite, applied as ``product(u) = A u``)."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, v)
    rr0 = _tree_vdot(v, v)

    def body(_, carry):
        q, r, p, rr = carry
        ap = product(p)
        pap = _tree_vdot(p, ap)
        step = jnp.where(pap > 0, rr / jnp.where(pap > 0, pap, 1.0), 0.0)
        q = jax.tree_util.tree_map(lambda a, b: a + step * b, q, p)
        r = jax.tree_util.tree_map(lambda a, b: a - step * b, r, ap)
        rr_new = _tree_vdot(r, r)
        beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
        p = jax.tree_util.tree_map(lambda a, b: a + beta * b, r, p)
        return q, r, p, rr_new

    q, *_ = jax.lax.fori_loop(0, terms, body, (zeros, v, v, rr0))
    return q


def extreme_eigenvalues(product: Callable[[PyTree], PyTree], v0: PyTree, *, steps: int = 30
                        ) -> tuple[jax.Array, jax.Array]:
    """``(lambda_min, lambda_max)`` of a symmetric operator ``product(u) = A u`` by ``steps``
    Lanczos iterations from ``v0`` (full reorthogonalisation; ``steps`` products of ``A``).

    The extreme Ritz values of the Krylov space ``span{v0, A v0, ..., A^(steps-1) v0}``: inside
    ``[lambda_min, lambda_max]``, converging to the ends first (exact once ``steps`` reaches the
    dimension, or the number of distinct eigenvalues ``v0`` touches). For a non-symmetric ``A``
    pass its symmetric part ``(A + A^T) / 2``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (got {steps!r})")
    flat0, unravel = jax.flatten_util.ravel_pytree(v0)
    n = flat0.shape[0]
    steps = min(steps, n)

    def apply(x):
        return jax.flatten_util.ravel_pytree(product(unravel(x)))[0]

    basis = jnp.zeros((steps + 1, n), flat0.dtype).at[0].set(flat0 / jnp.linalg.norm(flat0))

    def body(k, carry):
        basis, alphas, betas = carry
        w = apply(basis[k])
        a = jnp.vdot(basis[k], w)
        live = (jnp.arange(steps + 1) <= k)[:, None]
        for _ in range(2):  # classical Gram-Schmidt twice against the basis so far
            w = w - (basis * live).T @ ((basis * live) @ w)
        b = jnp.linalg.norm(w)
        basis = basis.at[k + 1].set(jnp.where(b > 0, w / jnp.where(b > 0, b, 1.0), 0.0))
        return basis, alphas.at[k].set(a), betas.at[k].set(b)

    _, alphas, betas = jax.lax.fori_loop(
        0, steps, body, (basis, jnp.zeros(steps, flat0.dtype), jnp.zeros(steps, flat0.dtype)))
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    ritz = jnp.linalg.eigvalsh(tri)
    return ritz[0], ritz[-1]


def implicit_gradient(inner_loss: LossFn | None, outer_loss: LossFn, params: PyTree, hyper: PyTree,
                      *, solver: str = "neumann", terms: int = 3, alpha: float | jax.Array = 1.0,
                      scale_by_alpha: bool = False, damping: float | jax.Array = 0.0,
                      grad_map: GradMap | None = None) -> MetaGradient:
    """The IFT hypergradient ``dL_out/dhyper`` at ``params`` treated as the inner optimum.

    Args:
      inner_loss: ``(params, hyper) -> (loss, aux)``; ``G`` is its gradient in ``params``. May be
        ``None`` when ``grad_map`` is given.
      outer_loss: ``(params, hyper) -> (loss, aux)``, evaluated at ``params`` (no unroll).
      params: the inner parameters (the ones ``q`` lives in); hyper: what the gradient is taken
        with respect to.
      solver: ``"neumann"`` or ``"cg"``; terms: ``J`` (Neumann) or the CG iterations.
      alpha: the Neumann step; scale_by_alpha: multiply the Neumann sum by ``alpha`` (the IFT value;
        the default ``False`` is the authors' convention: the implicit term ``(dG/dh)^T q`` divided
        by ``alpha``, the direct term ``dL_out/dh|direct`` as it is). No effect on ``"cg"``.
      damping: ``lambda >= 0``: invert ``H + lambda I`` instead of ``H`` (the proximal inner
        problem's IFT hypergradient; positive definite once ``lambda > -lambda_min(H)``). The
        default 0 is the plain IFT, the authors' form.
      grad_map: ``(params, hyper) -> (G, aux)`` to use instead of ``grad_params inner_loss`` (its
        Jacobian in ``params`` is inverted, transposed).
    Returns:
      ``MetaGradient`` with ``params_plus = params`` and ``inner_loss`` / ``inner_aux`` from
      ``inner_loss`` (``None`` / ``grad_map``'s aux when only ``grad_map`` is given).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown implicit solver {solver!r}; choose one of {SOLVERS}")
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 0:
        raise ValueError(f"terms must be an integer >= 0 (got {terms!r})")
    if isinstance(damping, (int, float)) and not damping >= 0:
        raise ValueError(f"damping must be >= 0 (got {damping!r})")
    if grad_map is None:
        if inner_loss is None:
            raise ValueError("implicit_gradient needs inner_loss or grad_map")

        def grad_map(p, h):
            (loss, aux), g = jax.value_and_grad(inner_loss, has_aux=True)(p, h)
            return g, (loss, aux)
        inner_loss_given = True
    else:
        inner_loss_given = False

    (out_loss, out_aux), (v, direct) = jax.value_and_grad(
        outer_loss, argnums=(0, 1), has_aux=True)(params, hyper)
    _, vjp_params, aux = jax.vjp(lambda p: grad_map(p, hyper), params, has_aux=True)

    def product(u):  # (H + damping I)^T u
        hu = vjp_params(u)[0]
        if isinstance(damping, (int, float)) and damping == 0:
            return hu
        return jax.tree_util.tree_map(lambda a, b: a + damping * b, hu, u)

    if solver == "neumann":
        q = neumann_inverse(product, v, terms=terms, alpha=alpha, scale_by_alpha=scale_by_alpha)
    else:
        q = cg_inverse(product, v, terms=terms)
    _, vjp_hyper = jax.vjp(lambda h: grad_map(params, h)[0], hyper)
    (mixed,) = vjp_hyper(q)
    grad = jax.tree_util.tree_map(lambda a, b: a - b, direct, mixed)
    in_loss, in_aux = aux if inner_loss_given else (None, aux)
    return MetaGradient(out_loss, grad, params, in_loss, in_aux, out_aux)

"""``maxl_jax.meta.implicit`` on quadratics whose implicit hypergradients are known in closed form.

The inner problem ``L_in(theta, h) = 1/2 theta^T A theta - theta^T B h`` (optimum ``A^-1 B h``), the
outer ``L_out(theta, h) = 1/2 ||theta - t||^2 + gamma/2 ||h||^2`` (a non-zero direct term), at the
inner optimum: the IFT hypergradient is ``gamma h + B^T A^-1 (theta - t)``, and with ``damping``
``lambda`` it is ``gamma h + B^T (A + lambda I)^-1 (theta - t)``.

* CG matches it to 1e-6 (to the damped value with ``damping``, also for an indefinite ``A`` once
  ``lambda > -lambda_min``); the Neumann series converges to it as ``J`` grows when the spectral
  radius of ``I - alpha A`` is < 1, and diverges when it is > 1.
* The truncated series at a convergent step can point the wrong way: ``J = 3`` gives the opposite
  sign to the exact hypergradient on a convex quadratic at its optimum, CG does not.
* ``scale_by_alpha=False`` divides the implicit term alone by ``alpha``, not the direct term.
* ``extreme_eigenvalues`` (Lanczos) finds a symmetric operator's extreme eigenvalues.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxl_jax.meta import implicit
from compat import enable_x64


def quadratic(eigenvalues, n_hyper=3, gamma=0.7, seed=0):
    """``(inner_loss, outer_loss, theta*, h, A, exact(damping))`` for ``A`` with ``eigenvalues``."""
    rng = np.random.default_rng(seed)
    n = len(eigenvalues)
    basis, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = basis @ np.diag(eigenvalues) @ basis.T
    b = rng.normal(size=(n, n_hyper))
    t = rng.normal(size=n)
    h = rng.normal(size=n_hyper)
    theta = np.linalg.solve(a, b @ h)

    def inner_loss(p, hh):
        return 0.5 * p @ (a @ p) - p @ (b @ hh), {}

    def outer_loss(p, hh):
        return 0.5 * jnp.sum((p - t) ** 2) + 0.5 * gamma * jnp.sum(hh ** 2), {}

    def exact(damping=0.0):
        return gamma * h + b.T @ np.linalg.solve(a + damping * np.eye(n), theta - t)

    return inner_loss, outer_loss, jnp.asarray(theta), jnp.asarray(h), a, exact


def rel_err(a, b):
    a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hypergradient(problem, **kw):
    inner_loss, outer_loss, theta, h, _, _ = problem
    return implicit.implicit_gradient(inner_loss, outer_loss, theta, h, **kw).grad_hyper


def test_cg_matches_the_closed_form_and_neumann_converges_when_the_spectral_radius_is_below_1():
    with enable_x64():
        problem = quadratic(np.geomspace(0.5, 20.0, 8))
        exact = problem[-1]()
        # The premise: theta is the inner optimum.
        assert float(jnp.linalg.norm(jax.grad(lambda p: problem[0](p, problem[3])[0])(
            problem[2]))) < 1e-12
        assert rel_err(hypergradient(problem, solver="cg", terms=8), exact) < 1e-6
        assert rel_err(hypergradient(problem, solver="cg", terms=3), exact) > 1e-3  # has teeth
        alpha = 1.0 / 20.0  # rho(I - alpha A) = 1 - 0.5 / 20 < 1
        errors = [rel_err(hypergradient(problem, terms=j, alpha=alpha, scale_by_alpha=True), exact)
                  for j in (3, 30, 300, 3000)]
        assert all(b < a for a, b in zip(errors, errors[1:])), errors
        assert errors[0] > 0.1 and errors[-1] < 1e-6, errors


def test_neumann_diverges_when_the_spectral_radius_is_above_1():
    with enable_x64():
        problem = quadratic(np.geomspace(0.5, 20.0, 8))
        exact = problem[-1]()
        alpha = 2.5 / 20.0  # 1 - alpha * 20 = -1.5: rho(I - alpha A) = 1.5
        errors = [rel_err(hypergradient(problem, terms=j, alpha=alpha, scale_by_alpha=True), exact)
                  for j in (30, 45, 60)]
        # The top eigendirection's component grows as 1.5^J (from a small start).
        assert errors[0] < errors[1] < errors[2] and errors[0] > 10 and errors[-1] > 1e6, errors


def test_three_neumann_terms_can_have_the_opposite_sign_to_the_exact_hypergradient():
    """A = diag(1, 100), alpha = 1/100 (convergent): J = 3 weighs the lambda = 1 direction by
    ``(1 - 0.99^4) / 1 ~ 0.04`` instead of 1, so a hypergradient that the small-curvature direction
    dominates comes out with the wrong sign; CG (2 iterations, exact in 2-D) does not."""
    with enable_x64():
        a = jnp.diag(jnp.asarray([1.0, 100.0]))
        b = jnp.asarray([-1.0, 5.0])  # B^T A^-1 v = -1 + 0.05 for v = (1, 1)
        t = jnp.asarray([-1.0, -1.0])

        def inner_loss(p, hh):
            return 0.5 * p @ (a @ p) - hh * (p @ b), {}

        def outer_loss(p, hh):
            return 0.5 * jnp.sum((p - t) ** 2), {}

        theta = jnp.zeros(2)  # the optimum at h = 0; v = theta - t = (1, 1)
        h = jnp.asarray(0.0)
        exact = -1.0 + 5.0 / 100.0
        three = implicit.implicit_gradient(inner_loss, outer_loss, theta, h, terms=3, alpha=0.01,
                                           scale_by_alpha=True).grad_hyper
        many = implicit.implicit_gradient(inner_loss, outer_loss, theta, h, terms=3000, alpha=0.01,
                                          scale_by_alpha=True).grad_hyper
        cg = implicit.implicit_gradient(inner_loss, outer_loss, theta, h, solver="cg",
                                        terms=2).grad_hyper
        assert float(three) * exact < 0, (float(three), exact)
        assert abs(float(many) - exact) < 1e-8 and abs(float(cg) - exact) < 1e-10


def test_scale_by_alpha_false_divides_only_the_implicit_term_by_alpha():
    with enable_x64():
        problem = quadratic(np.geomspace(0.5, 20.0, 8))
        inner_loss, outer_loss, theta, h, _, _ = problem
        direct = jax.grad(lambda hh: outer_loss(theta, hh)[0])(h)
        assert float(jnp.linalg.norm(direct)) > 0.1  # a direct term to tell the two readings apart
        alpha = 0.04
        ift = hypergradient(problem, terms=10, alpha=alpha, scale_by_alpha=True)
        theirs = hypergradient(problem, terms=10, alpha=alpha, scale_by_alpha=False)
        np.testing.assert_allclose(theirs, direct + (ift - direct) / alpha, rtol=1e-12)
        assert rel_err(theirs, ift / alpha) > 1e-3
        # CG ignores it.
        np.testing.assert_array_equal(hypergradient(problem, solver="cg", terms=8,
                                                    scale_by_alpha=False),
                                      hypergradient(problem, solver="cg", terms=8,
                                                    scale_by_alpha=True))


def test_damping_gives_the_closed_form_of_the_damped_system_even_for_an_indefinite_hessian():
    with enable_x64():
        eigenvalues = np.asarray([-3.0, -0.5, 0.01, 1.0, 4.0, 10.0, 30.0])
        problem = quadratic(eigenvalues, seed=1)
        exact = problem[-1]
        lam = 3.0 + 0.1 * 30.0  # -lambda_min + 0.1 lambda_max: H + lambda I positive definite
        assert rel_err(hypergradient(problem, solver="cg", terms=7, damping=lam), exact(lam)) < 1e-6
        assert rel_err(hypergradient(problem, solver="cg", terms=7, damping=lam), exact()) > 0.1
        # The damped Neumann series converges to it too (rho = 1 - 3 / 36 < 1) ...
        damped = hypergradient(problem, terms=2000, alpha=1.0 / (30.0 + lam), damping=lam,
                               scale_by_alpha=True)
        assert rel_err(damped, exact(lam)) < 1e-6
        # ... where the undamped series at the same step diverges (rho = 1 + 3 / 36 > 1).
        undamped = hypergradient(problem, terms=300, alpha=1.0 / (30.0 + lam), scale_by_alpha=True)
        assert rel_err(undamped, exact()) > 10
        # damping=0 is the undamped estimator exactly; a traced damping works under jit.
        np.testing.assert_array_equal(hypergradient(problem, terms=5, alpha=0.01, damping=0.0),
                                      hypergradient(problem, terms=5, alpha=0.01))
        inner_loss, outer_loss, theta, h, _, _ = problem
        jitted = jax.jit(lambda d: implicit.implicit_gradient(
            inner_loss, outer_loss, theta, h, solver="cg", terms=7, damping=d).grad_hyper)
        np.testing.assert_allclose(jitted(jnp.asarray(lam)), exact(lam), rtol=1e-6)
        with pytest.raises(ValueError, match="damping must be >= 0"):
            hypergradient(problem, damping=-1.0)


def test_lanczos_finds_the_extreme_eigenvalues_of_a_symmetric_operator():
    with enable_x64():
        rng = np.random.default_rng(3)
        eigenvalues = np.concatenate([[-4.0], rng.uniform(-1.0, 20.0, 58), [41.0]])
        basis, _ = np.linalg.qr(rng.normal(size=(60, 60)))
        a = jnp.asarray(basis @ np.diag(eigenvalues) @ basis.T)
        start = {"x": jnp.asarray(rng.normal(size=(20,))), "y": jnp.asarray(rng.normal(size=(40,)))}

        def product(u):  # A on a pytree of two leaves
            flat = jnp.concatenate([u["x"], u["y"]])
            out = a @ flat
            return {"x": out[:20], "y": out[20:]}

        lo, hi = implicit.extreme_eigenvalues(product, start, steps=60)
        np.testing.assert_allclose([float(lo), float(hi)], [-4.0, 41.0], rtol=1e-8)
        lo, hi = implicit.extreme_eigenvalues(product, start, steps=25)
        # Ritz values lie inside the spectrum and the isolated ends converge first.
        assert -4.0 - 1e-9 <= float(lo) < -3.9 and 40.9 < float(hi) <= 41.0 + 1e-9, (lo, hi)
        lo, hi = implicit.extreme_eigenvalues(product, start, steps=3)
        assert float(lo) > -4.0 + 0.1 or float(hi) < 41.0 - 0.1  # too few steps: visibly short
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            implicit.extreme_eigenvalues(product, start, steps=0)

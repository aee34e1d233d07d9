"""The gradient estimators of ``maxl_jax.meta`` besides the exact unroll (tested in test_meta.py).

* The finite-difference first-order form approaches the exact one-step meta-gradient as its radius
  shrinks, and is the reference's formula.
* The implicit (IFT) hypergradient: on ridge regression, whose inner optimum and hypergradient are
  known in closed form, conjugate gradient matches the analytic value and the Neumann series
  converges to it as J grows; on a tiny network at an inner optimum found by Newton's method, it
  matches float64 central finite differences of ``L_out(theta*(h))``.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxl_jax import meta
from compat import enable_x64


def tiny_problem():
    """A 2-layer tanh MLP (params) trained on a primary loss plus soft auxiliary targets (hyper)."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float64)  # noqa: E731
    params = {"w1": normal(4, 6), "w2": normal(6, 3) * 0.5}
    x = normal(8, 4)
    y = jnp.asarray(rng.integers(0, 3, 8))
    hyper = jax.nn.softmax(normal(8, 3))

    def logits(p):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    def inner_loss(p, h):
        logp = jax.nn.log_softmax(logits(p))
        return -jnp.mean(logp[jnp.arange(8), y]) - jnp.mean(jnp.sum(h * logp, -1)), {}

    def outer_loss(p_plus, h):
        logp = jax.nn.log_softmax(logits(p_plus))
        pbar = jnp.mean(h, 0)
        return -jnp.mean(logp[jnp.arange(8), y]) + 0.2 * jnp.sum(pbar * jnp.log(pbar)), {}

    return params, hyper, inner_loss, outer_loss


def rel_err(a, b):
    a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_finite_difference_approaches_the_exact_meta_gradient_as_the_radius_shrinks():
    with enable_x64():
        params, hyper, inner_loss, outer_loss = tiny_problem()
        opt = optax.sgd(0.5)
        exact = meta.meta_gradient(inner_loss, outer_loss, params, hyper, opt).grad_hyper
        errors = [rel_err(meta.finite_difference_meta_gradient(
            inner_loss, outer_loss, params, hyper, opt, radius=r).grad_hyper, exact)
            for r in (0.3, 0.1, 0.03, 0.01, 0.001)]
        # Central differences: error O(radius^2), so each 3.3x smaller radius gains ~10x.
        assert all(b < a for a, b in zip(errors, errors[1:])), errors
        assert errors[0] > 1e-2 and errors[-1] < 1e-5, errors
        assert errors[1] / errors[3] > 50, errors
        # The mixed term is not negligible here, so the agreement is not the direct term's alone.
        direct = jax.grad(lambda h: outer_loss(
            meta.meta_gradient(inner_loss, outer_loss, params, hyper, opt).params_plus, h)[0])(hyper)
        assert rel_err(direct, exact) > 0.05


def test_finite_difference_is_the_reference_formula_for_sgd():
    """-alpha [grad_h L_in(theta + eps v) - grad_h L_in(theta - eps v)] / (2 eps), eps = 0.01/||v||,
    v = grad L_out(theta+), plus the direct term; also reachable as meta_gradient's form."""
    with enable_x64():
        params, hyper, inner_loss, outer_loss = tiny_problem()
        alpha = 0.5
        ours = meta.meta_gradient(inner_loss, outer_loss, params, hyper, optax.sgd(alpha),
                                  form="finite_difference")
        g = jax.grad(lambda p: inner_loss(p, hyper)[0])(params)
        plus = jax.tree_util.tree_map(lambda p, d: p - alpha * d, params, g)
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(ours.params_plus)[0],
                                   jax.flatten_util.ravel_pytree(plus)[0], rtol=1e-14)
        v, direct = jax.grad(lambda p, h: outer_loss(p, h)[0], argnums=(0, 1))(plus, hyper)
        eps = 0.01 / jnp.linalg.norm(jax.flatten_util.ravel_pytree(v)[0])
        grad_h = jax.grad(lambda p, h: inner_loss(p, h)[0], argnums=1)
        shift = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * eps * d, params, v)  # noqa: E731
        reference = direct - alpha * (grad_h(shift(1.0), hyper) - grad_h(shift(-1.0), hyper)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(ours.grad_hyper), np.asarray(reference), rtol=1e-9,
                                   atol=1e-12)


# ----------------------------------------------------------------------------- implicit: ridge

def ridge_problem(d=6):
    """Inner: 1/2n ||X theta - y||^2 + 1/2 sum_i exp(h_i) theta_i^2; outer: validation MSE / 2."""
    rng = np.random.default_rng(1)
    x, xv = rng.normal(size=(40, d)), rng.normal(size=(30, d))
    w_true = rng.normal(size=d)
    y, yv = x @ w_true + 0.3 * rng.normal(size=40), xv @ w_true + 0.3 * rng.normal(size=30)
    h = np.log(rng.uniform(0.2, 2.0, size=d))
    hess = x.T @ x / 40 + np.diag(np.exp(h))
    theta = np.linalg.solve(hess, x.T @ y / 40)
    g_out = xv.T @ (xv @ theta - yv) / 30
    analytic = -np.linalg.solve(hess, g_out) * np.exp(h) * theta

    def inner_loss(p, hh):
        return 0.5 * jnp.mean((x @ p - y) ** 2) + 0.5 * jnp.sum(jnp.exp(hh) * p ** 2), {}

    def outer_loss(p, hh):
        return 0.5 * jnp.mean((xv @ p - yv) ** 2), {}

    return inner_loss, outer_loss, jnp.asarray(theta), jnp.asarray(h), analytic, hess


def test_conjugate_gradient_matches_the_analytic_ridge_hypergradient():
    with enable_x64():
        inner_loss, outer_loss, theta, h, analytic, _ = ridge_problem()
        # The inner problem really is at its optimum: the IFT's premise.
        assert float(jnp.linalg.norm(jax.grad(lambda p: inner_loss(p, h)[0])(theta))) < 1e-12
        cg = meta.implicit_gradient(inner_loss, outer_loss, theta, h, solver="cg", terms=6)
        assert rel_err(cg.grad_hyper, analytic) < 1e-6
        # Too few CG iterations leave a visible error: the comparison has teeth.
        assert rel_err(meta.implicit_gradient(inner_loss, outer_loss, theta, h, solver="cg",
                                              terms=2).grad_hyper, analytic) > 1e-3


def test_neumann_series_converges_to_the_analytic_ridge_hypergradient_as_terms_grow():
    with enable_x64():
        inner_loss, outer_loss, theta, h, analytic, hess = ridge_problem()
        alpha = 1.0 / float(np.linalg.eigvalsh(hess).max())
        errors = [rel_err(meta.implicit_gradient(inner_loss, outer_loss, theta, h, solver="neumann",
                                                 terms=j, alpha=alpha,
                                                 scale_by_alpha=True).grad_hyper, analytic)
                  for j in (1, 4, 16, 64)]
        assert all(b < a for a, b in zip(errors, errors[1:])), errors
        assert errors[0] > 0.1 and errors[-1] < 1e-10, errors
        # The authors' convention (no leading alpha) is the same estimate divided by alpha.
        theirs = meta.implicit_gradient(inner_loss, outer_loss, theta, h, solver="neumann",
                                        terms=20, alpha=alpha)
        ours = meta.implicit_gradient(inner_loss, outer_loss, theta, h, solver="neumann",
                                      terms=20, alpha=alpha, scale_by_alpha=True)
        np.testing.assert_allclose(np.asarray(theirs.grad_hyper) * alpha,
                                   np.asarray(ours.grad_hyper), rtol=1e-12)


# ----------------------------------------------------------------------- implicit: tiny network

def network_problem():
    """A tanh MLP; inner: primary + softplus(h) * auxiliary cross-entropy + L2; outer: primary
    cross-entropy on held-out data."""
    rng = np.random.default_rng(2)
    x, xv = rng.normal(size=(24, 3)), rng.normal(size=(16, 3))
    y, yv = rng.integers(0, 2, 24), rng.integers(0, 2, 16)
    aux = rng.integers(0, 2, 24)
    _, unravel = jax.flatten_util.ravel_pytree({"w1": np.zeros((3, 4)), "w2": np.zeros((4, 4))})

    def heads(flat, inputs):
        p = unravel(flat)
        out = jnp.tanh(inputs @ p["w1"]) @ p["w2"]
        return jax.nn.log_softmax(out[:, :2]), jax.nn.log_softmax(out[:, 2:])

    def inner_loss(flat, hh):
        pri, au = heads(flat, x)
        l_pri = -jnp.mean(pri[jnp.arange(24), y])
        l_aux = -jnp.mean(au[jnp.arange(24), aux])
        return l_pri + jax.nn.softplus(hh) * l_aux + 0.05 * jnp.sum(flat ** 2), {}

    def outer_loss(flat, hh):
        pri, _ = heads(flat, xv)
        return -jnp.mean(pri[jnp.arange(16), yv]), {}

    def solve(hh, start):
        g = jax.jit(jax.grad(lambda p: inner_loss(p, hh)[0]))
        hess = jax.jit(jax.hessian(lambda p: inner_loss(p, hh)[0]))
        p = start
        for _ in range(300):  # gradient descent, then Newton to machine precision
            p = p - 0.5 * g(p)
        for _ in range(20):
            p = p - jnp.linalg.solve(hess(p), g(p))
        return p, float(jnp.linalg.norm(g(p))), np.linalg.eigvalsh(np.asarray(hess(p)))

    start = jnp.asarray(0.5 * rng.normal(size=28))
    return inner_loss, outer_loss, solve, start


def test_implicit_gradient_matches_finite_differences_at_a_tiny_networks_inner_optimum():
    with enable_x64():
        inner_loss, outer_loss, solve, start = network_problem()
        h = jnp.asarray(0.3)
        theta, grad_norm, eigenvalues = solve(h, start)
        assert grad_norm < 1e-10 and eigenvalues.min() > 0  # a strict local minimum
        eps = 1e-5
        plus, _, _ = solve(h + eps, theta)
        minus, _, _ = solve(h - eps, theta)
        fd = (outer_loss(plus, h)[0] - outer_loss(minus, h)[0]) / (2 * eps)
        cg = meta.implicit_gradient(inner_loss, outer_loss, theta, h, solver="cg", terms=28)
        assert abs(float(cg.grad_hyper) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))
        assert abs(float(fd)) > 1e-3  # the auxiliary weight does move the outer loss
        alpha = 1.0 / float(eigenvalues.max())
        neumann = meta.implicit_gradient(inner_loss, outer_loss, theta, h, solver="neumann",
                                         terms=4000, alpha=alpha, scale_by_alpha=True)
        assert abs(float(neumann.grad_hyper) - float(fd)) < 1e-4 * abs(float(fd))


def test_implicit_gradient_rejects_bad_arguments():
    inner_loss, outer_loss, theta, h, _, _ = ridge_problem()
    with pytest.raises(ValueError, match="unknown implicit solver 'lu'"):
        meta.implicit_gradient(inner_loss, outer_loss, theta, h, solver="lu")
    with pytest.raises(ValueError, match="terms must be an integer >= 0"):
        meta.implicit_gradient(inner_loss, outer_loss, theta, h, terms=-1)
    with pytest.raises(ValueError, match="needs inner_loss or grad_map"):
        meta.implicit_gradient(None, outer_loss, theta, h)

"""The estimator behind the meta step is exact: it matches float64 central finite differences.

A tiny two-layer network keeps every check fast; the full MAXL objective on a conv net is checked in
test_maxl.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxl_jax import meta
from compat import enable_x64

INNER_OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.3),
    "sgd_momentum": lambda: optax.sgd(0.3, momentum=0.9),
}


def tiny_problem():
    """params: a 2-layer tanh MLP; hyper: soft targets (B, K) as MAXL's generated labels."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    params = {"w1": normal(4, 6), "w2": normal(6, 3) * 0.5}
    x = normal(8, 4)
    y = jnp.asarray(rng.integers(0, 3, 8))
    hyper = jax.nn.softmax(normal(8, 3))

    def logits(p):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    def inner_loss(p, h):
        logp = jax.nn.log_softmax(logits(p))
        pri = -jnp.mean(logp[jnp.arange(8), y])
        aux = -jnp.mean(jnp.sum(h * logp, -1))
        return pri + aux, {"pri": pri}

    def outer_loss(p_plus, h):
        logp = jax.nn.log_softmax(logits(p_plus))
        pbar = jnp.mean(h, 0)
        return -jnp.mean(logp[jnp.arange(8), y]) + 0.2 * jnp.sum(pbar * jnp.log(pbar)), {}

    return params, hyper, inner_loss, outer_loss


def objective(params, hyper, inner_loss, outer_loss, opt, steps):
    p_plus, _, _ = meta.unrolled_update(lambda p: inner_loss(p, hyper), params, opt, steps)
    return outer_loss(p_plus, hyper)[0]


@pytest.mark.parametrize("opt_name", sorted(INNER_OPTIMIZERS))
@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_equals_float64_central_finite_difference(opt_name, steps):
    with enable_x64():
        params, hyper, inner_loss, outer_loss = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if hasattr(a, "dtype") and a.dtype == jnp.float32 else a,
            tiny_problem())
        opt = INNER_OPTIMIZERS[opt_name]()
        result = meta.meta_gradient(inner_loss, outer_loss, params, hyper, opt, steps=steps)
        grad = np.asarray(result.grad_hyper)
        eps = 1e-6
        fd = np.zeros_like(grad)
        for i in range(grad.shape[0]):
            for j in range(grad.shape[1]):
                e = jnp.zeros_like(hyper).at[i, j].set(eps)
                fd[i, j] = (objective(params, hyper + e, inner_loss, outer_loss, opt, steps)
                            - objective(params, hyper - e, inner_loss, outer_loss, opt, steps)) / (2 * eps)
        rel = np.linalg.norm(grad - fd) / np.linalg.norm(fd)
        assert rel < 1e-4, rel
        # The meta-gradient really is second order: dropping the mixed term changes it.
        direct = np.asarray(jax.grad(lambda h: outer_loss(result.params_plus, h)[0])(hyper))
        assert np.linalg.norm(grad - direct) > 1e-3 * np.linalg.norm(grad)


@pytest.mark.parametrize("opt", [optax.sgd(0.3), optax.sgd(0.3, momentum=0.9),
                                 optax.adam(0.1, eps_root=1e-8), optax.chain(
                                     optax.add_decayed_weights(1e-2), optax.sgd(0.1))],
                         ids=["sgd", "momentum", "adam", "sgd_weight_decay"])
def test_forward_over_reverse_equals_reverse(opt):
    with enable_x64():
        params, hyper, inner_loss, outer_loss = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if hasattr(a, "dtype") and a.dtype == jnp.float32 else a,
            tiny_problem())
        rev = meta.meta_gradient(inner_loss, outer_loss, params, hyper, opt, form="reverse")
        fwd = meta.meta_gradient(inner_loss, outer_loss, params, hyper, opt,
                                 form="forward_over_reverse")
        np.testing.assert_allclose(np.asarray(fwd.grad_hyper), np.asarray(rev.grad_hyper),
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(float(fwd.outer_loss), float(rev.outer_loss), rtol=1e-12)


def test_adam_inner_optimizer_with_eps_root_gives_a_finite_meta_gradient_where_a_gradient_is_zero():
    params, hyper, base_inner_loss, base_outer_loss = tiny_problem()
    zero_feature = jnp.zeros((8, 4))  # an input feature that is always 0, like zero padding
    params = {**params, "dead": jnp.full((4,), 0.1)}

    def inner_loss(p, h):
        # The weight of a zero feature: its gradient is exactly zero but still depends on h.
        dead = jnp.mean((zero_feature @ p["dead"]) * h[:, 0])
        loss, aux = base_inner_loss(p, h)
        return loss + dead, aux

    def outer_loss_all_params(p_plus, h):  # as in a real network, every parameter matters outside
        loss, aux = base_outer_loss(p_plus, h)
        return loss + 1e-3 * jnp.sum(p_plus["dead"] ** 2), aux

    outer_loss = outer_loss_all_params
    ok = meta.meta_gradient(inner_loss, outer_loss, params, hyper, optax.adam(0.1, eps_root=1e-8))
    assert np.all(np.isfinite(np.asarray(ok.grad_hyper)))
    # The pitfall the eps_root guards against (maxl-reference.md): eps_root=0 gives NaN.
    bad = meta.meta_gradient(inner_loss, outer_loss, params, hyper, optax.adam(0.1, eps_root=0.0))
    assert np.any(np.isnan(np.asarray(bad.grad_hyper)))


def test_bad_form_and_steps_are_rejected():
    params, hyper, inner_loss, outer_loss = tiny_problem()
    with pytest.raises(ValueError, match="unknown meta-gradient form"):
        meta.meta_gradient(inner_loss, outer_loss, params, hyper, optax.sgd(0.1), form="fd")
    with pytest.raises(ValueError, match="steps=1 only"):
        meta.meta_gradient(inner_loss, outer_loss, params, hyper, optax.sgd(0.1), steps=2,
                           form="forward_over_reverse")
    with pytest.raises(ValueError, match="inner steps must be >= 1"):
        meta.meta_gradient(inner_loss, outer_loss, params, hyper, optax.sgd(0.1), steps=0)


def test_a_loss_without_aux_is_a_clear_type_error():
    """meta_gradient's losses return (scalar, aux): a bare scalar, or a non-scalar first entry, is
    a TypeError naming the loss and the fix, before anything is differentiated."""
    import optax

    from maxl_jax.meta import unroll

    params, hyper = {"w": jnp.ones(3)}, jnp.ones(3)

    def good(p, h):
        return jnp.sum(p["w"] * h), None

    def scalar(p, h):
        return jnp.sum(p["w"] * h)

    def vector(p, h):
        return p["w"] * h, None

    with pytest.raises(TypeError, match=r"inner_loss\(params, hyper\) must return \(scalar loss, "
                       r"aux pytree\); it returned shape \(\)\. Return `\(loss, None\)`"):
        unroll.meta_gradient(scalar, good, params, hyper, optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"outer_loss.*a tuple of 2"):
        unroll.meta_gradient(good, vector, params, hyper, optax.sgd(0.1))
    res = unroll.meta_gradient(good, good, params, hyper, optax.sgd(0.1))
    assert res.grad_hyper.shape == (3,)

"""``benchmarks/fd_radius.py``'s plumbing on a tiny smooth problem: the radius it swaps into
``meta_gradient(form="finite_difference")`` is the one used, the points it records are the module's
``theta -+ radius w / ||w||``, and its first-order term is the direct term (so exact minus it is the
second-order part)."""

import functools

import jax
import jax.flatten_util
import numpy as np
import optax

from benchmarks import fd_radius
from compat import enable_x64
from maxl_jax import meta
from test_estimators import tiny_problem


def _flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def test_swapped_radius_recorded_points_and_first_order_term():
    with enable_x64():
        params, hyper, inner_loss, outer_loss = tiny_problem()
        opt, r = optax.sgd(0.5), 1e-3
        points = []
        with fd_radius.swapped_fd(functools.partial(meta.finite_difference_meta_gradient,
                                                    radius=r)), fd_radius.recording_points(points):
            swapped = meta.meta_gradient(inner_loss, outer_loss, params, hyper, opt,
                                         form="finite_difference")
        direct = meta.finite_difference_meta_gradient(inner_loss, outer_loss, params, hyper, opt,
                                                      radius=r)
        np.testing.assert_array_equal(_flat(swapped.grad_hyper), _flat(direct.grad_hyper))
        plus, minus, theta = _flat(points[0]), _flat(points[1]), _flat(params)
        assert len(points) == 2
        np.testing.assert_allclose(np.linalg.norm(plus - minus), 2 * r, rtol=1e-12)
        np.testing.assert_allclose(plus + minus, 2 * theta, atol=1e-14)

        with fd_radius.swapped_fd(fd_radius.first_order_only):
            first = meta.meta_gradient(inner_loss, outer_loss, params, hyper, opt,
                                       form="finite_difference")
        exact = meta.meta_gradient(inner_loss, outer_loss, params, hyper, opt)
        term = jax.grad(lambda h: outer_loss(exact.params_plus, h)[0])(hyper)
        np.testing.assert_allclose(_flat(first.grad_hyper), _flat(term), rtol=1e-12)
        second = _flat(exact.grad_hyper) - _flat(first.grad_hyper)
        assert np.linalg.norm(second) > 0.05 * np.linalg.norm(_flat(exact.grad_hyper))

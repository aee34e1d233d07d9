"""Tailoring and meta-tailoring (maxl_jax/methods/tailoring.py): the per-example inner update, the
meta-tailoring gradient through it, and both methods through the training loop."""

import sys
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxl_jax import methods, models, validation
from maxl_jax.methods import tailoring as T

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from compat import enable_x64  # noqa: E402


def linear_problem(dtype, seed=0, b=4, d=5, f=3, c=4):
    """A tiny differentiable stand-in for backbone + head: features = tanh(x @ w1),
    logits = features @ w2 + b2."""
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    theta = {"w1": jax.random.normal(k[0], (d, f), dtype), "w2": jax.random.normal(k[1], (f, c), dtype),
             "b2": 0.1 * jax.random.normal(k[2], (c,), dtype)}
    x = jax.random.normal(k[3], (b, d), dtype)
    y = jnp.arange(b) % c
    return theta, x, y


def outer(theta, x, y, steps, lr, first_order=False):
    feats = jnp.tanh(x @ theta["w1"])
    logits, _ = T.tailor(lambda h: h @ theta["w2"] + theta["b2"], T.entropy_loss, feats, x, steps,
                         lr, first_order)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def test_the_meta_tailoring_gradient_matches_float64_central_differences():
    with enable_x64():
        theta, x, y = linear_problem(jnp.float64)
        grad = jax.grad(outer)(theta, x, y, 2, 0.5)
        flat, unravel = jax.flatten_util.ravel_pytree(theta)
        eps = 1e-6
        fd = np.array([(outer(unravel(flat + eps * e), x, y, 2, 0.5)
                        - outer(unravel(flat - eps * e), x, y, 2, 0.5)) / (2 * eps)
                       for e in np.eye(flat.size)])
        exact = np.asarray(jax.flatten_util.ravel_pytree(grad)[0])
        np.testing.assert_allclose(exact, fd, rtol=1e-6, atol=1e-8)
        # the inner steps matter: the gradient through them differs from the first-order one
        first = jax.flatten_util.ravel_pytree(jax.grad(outer)(theta, x, y, 2, 0.5, True))[0]
        assert np.abs(exact - np.asarray(first)).max() > 1e-4


def test_the_first_order_gradient_is_the_exact_one_with_the_inner_jacobian_dropped():
    theta, x, y = linear_problem(jnp.float32, seed=1)
    steps, lr = 3, 0.3
    feats = jnp.tanh(x @ theta["w1"])
    _, cn = T.tailor(lambda h: h @ theta["w2"] + theta["b2"], T.entropy_loss, feats, x, steps, lr)
    cn = jax.lax.stop_gradient(cn)

    def hand(t):  # the outer loss at the adapted (gamma, beta), held fixed
        h = jnp.tanh(x @ t["w1"]) * cn["gamma"] + cn["beta"]
        logits = h @ t["w2"] + t["b2"]
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    got = jax.grad(outer)(theta, x, y, steps, lr, True)
    want = jax.grad(hand)(theta)
    for k in theta:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_tailoring_a_batch_equals_tailoring_each_example_alone():
    theta, x, _ = linear_problem(jnp.float32, seed=2, b=6)
    feats = jnp.tanh(x @ theta["w1"])
    head = lambda h: h @ theta["w2"] + theta["b2"]  # noqa: E731
    batch, cn = T.tailor(head, T.entropy_loss, feats, x, 3, 0.5)
    assert np.abs(np.asarray(cn["gamma"]) - 1).max() > 1e-3  # it adapted
    for i in range(6):
        alone, _ = T.tailor(head, T.entropy_loss, feats[i:i + 1], x[i:i + 1], 3, 0.5)
        np.testing.assert_allclose(batch[i], alone[0], rtol=1e-5, atol=1e-6)


def test_tailoring_lowers_each_inputs_unsupervised_loss():
    theta, x, _ = linear_problem(jnp.float32, seed=3, b=8)
    feats = jnp.tanh(x @ theta["w1"])
    head = lambda h: h @ theta["w2"] + theta["b2"]  # noqa: E731
    before = T.entropy_loss(head(feats), feats, x)
    after = T.entropy_loss(T.tailor(head, T.entropy_loss, feats, x, 1, 0.1)[0], feats, x)
    assert np.all(np.asarray(after) < np.asarray(before))


def tiny_method(name, **kw):
    mt, _ = models.make_networks("small", 3, 6, 6, width=1, head_width=4, image_shape=(8, 8, 3))
    return methods.get(name)(multitask=mt, multitask_optimizer=optax.sgd(0.1), **kw)


def test_inner_steps_0_is_the_plain_model_and_tailoring_changes_it():
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 3))
    batch = {"image": x, "primary": jnp.array([0, 1, 2, 0, 1])}
    plain = tiny_method("single")
    state = plain.init(jax.random.PRNGKey(0), (8, 8, 3))
    zero = tiny_method("tailoring", inner_steps=0)
    ref, _ = plain.multitask.apply(state.multitask_variables, x, False)
    np.testing.assert_array_equal(zero.predict(state.multitask_variables, x), ref)
    a, b = jax.jit(plain.eval_step)(state, batch), jax.jit(zero.eval_step)(state, batch)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)
    tailored = tiny_method("tailoring", inner_steps=2, inner_lr=1.0).predict(
        state.multitask_variables, x)
    assert np.abs(np.asarray(tailored - ref)).max() > 1e-4
    # meta-tailoring with no inner step trains exactly like single-task
    meta0 = tiny_method("meta_tailoring", inner_steps=0)
    s1, m1 = jax.jit(plain.train_step)(state, batch)
    s2, m2 = jax.jit(meta0.train_step)(state, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
                           s1.multitask_params, s2.multitask_params)


def test_the_config_fields_are_checked_and_named():
    from experiments.configs import tiny
    for name in ("tailoring", "meta_tailoring"):
        c = tiny.get_config()
        c.method = name
        c[name].inner_steps = -1
        with pytest.raises(validation.ConfigError, match=f"{name}.inner_steps"):
            methods.get(name).validate_config(c)
        c[name].inner_steps = 1
        c[name].loss = "nope"
        with pytest.raises(validation.ConfigError, match=f"{name}.loss"):
            methods.get(name).validate_config(c)


@pytest.mark.parametrize("method, first_order", [("tailoring", False), ("meta_tailoring", False),
                                                 ("meta_tailoring", True)])
def test_a_tiny_training_run_completes_and_its_summary_names_the_mode(method, first_order,
                                                                      tmp_path):
    from test_train import run, tiny_config
    config = tiny_config(method=method, epochs=1)
    if method == "meta_tailoring":
        config.meta_tailoring.first_order = first_order
    summary = run(config, tmp_path)
    assert "CNGrad" in summary["mode"]["tailoring"]
    assert summary["mode"]["tailoring_loss"].startswith("entropy")
    if method == "meta_tailoring":
        assert summary["mode"]["meta_gradient"].startswith("first order" if first_order
                                                           else "exact")
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0

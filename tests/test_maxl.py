"""MAXL's meta-gradient w.r.t. the label generator is exact, on a real (tiny) conv network.

The whole objective (generator -> mask softmax -> inner optax step(s) of the multi-task network ->
primary loss at theta1+ plus the entropy term) is checked against float64 central finite differences.
"""

import functools

import jax.flatten_util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxl_jax import losses, maxl, models, steps
from compat import enable_x64

PSI = (2, 3)


def jit_meta_gradient(mt, gen, **kw):
    """maxl.generator_meta_gradient compiled for fixed networks and settings (eager dispatch is slow)."""
    return jax.jit(lambda f_vars, g_vars, x, y: maxl.generator_meta_gradient(mt, gen, f_vars, g_vars, x, y,
                                                                  PSI, **kw))


@functools.lru_cache(maxsize=None)
def tiny_setup(dtype=jnp.float64):
    mt, gen = models.make_networks("small", len(PSI), sum(PSI), sum(PSI), width=2, head_width=16,
                                   conv_impl="xla")
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8, 8, 1)), dtype)
    y = jnp.array([0, 1, 1, 0, 1, 0])
    init_f = jax.jit(mt.init, static_argnums=2)
    init_g = jax.jit(gen.init, static_argnums=2)
    f_vars = jax.tree_util.tree_map(lambda a: a.astype(dtype), init_f(k[1], x, False))
    g_vars = jax.tree_util.tree_map(lambda a: a.astype(dtype), init_g(k[2], x, False))
    return mt, gen, f_vars, g_vars, x, y


def meta_objective(g_params, opt, steps):
    """The meta objective recomputed from scratch, for finite differences."""
    mt, gen, f_vars, g_vars, x, y = tiny_setup()
    soft, _ = maxl.generate_labels(gen, {**g_vars, "params": g_params}, x, y, PSI)

    def inner(p):
        return maxl.multitask_loss(mt, p, f_vars["batch_stats"], x, y, soft)

    params = f_vars["params"]
    state = opt.init(params)
    for _ in range(steps):
        g = jax.grad(lambda p: inner(p)[0])(params)
        u, state = opt.update(g, state, params)
        params = optax.apply_updates(params, u)
    (pri_logits, _), _ = mt.apply({"params": params, "batch_stats": f_vars["batch_stats"]}, x, True,
                                  mutable=["batch_stats"])
    return losses.primary_focal_loss(pri_logits, y) + 0.2 * losses.entropy_term(soft)


@pytest.mark.parametrize("opt_name, steps", [("sgd", 1), ("sgd", 2), ("momentum", 1),
                                             ("momentum", 2)])
def test_meta_gradient_equals_float64_finite_difference_on_a_conv_net(opt_name, steps):
    with enable_x64():
        mt, gen, f_vars, g_vars, x, y = tiny_setup()
        opt = optax.sgd(0.5) if opt_name == "sgd" else optax.sgd(0.5, momentum=0.9)
        result = jit_meta_gradient(mt, gen, inner_optimizer=opt, inner_steps=steps)(
            f_vars, g_vars, x, y)
        np.testing.assert_allclose(float(result.meta_loss),
                                   float(meta_objective(g_vars["params"], opt, steps)), rtol=1e-12)
        flat, unravel = jax.flatten_util.ravel_pytree(g_vars["params"])
        grad = np.asarray(jax.flatten_util.ravel_pytree(result.grad)[0])
        f = jax.jit(lambda v: meta_objective(unravel(v), opt, steps))
        eps = 1e-6
        # Directional derivatives along 24 random directions of theta2, central differences.
        dirs = np.random.default_rng(0).normal(size=(24, flat.size))
        fd = np.array([(f(flat + eps * v) - f(flat - eps * v)) / (2 * eps) for v in dirs])
        rel = np.linalg.norm(dirs @ grad - fd) / np.linalg.norm(fd)
        assert rel < 1e-4, rel
        if (opt_name, steps) != ("sgd", 1):
            return
        # The check has teeth: the second-order part (through theta1+) is a sizeable share of it.
        first_order = jit_meta_gradient(mt, gen, inner_optimizer=optax.sgd(0.0),
                                        inner_steps=steps)(f_vars, g_vars, x, y)
        mixed = grad - np.asarray(jax.flatten_util.ravel_pytree(first_order.grad)[0])
        assert np.linalg.norm(mixed) > 1e-2 * np.linalg.norm(grad)


def test_forward_over_reverse_equals_reverse_for_maxl():
    mt, gen, f_vars, g_vars, x, y = tiny_setup(jnp.float32)
    kw = dict(inner_lr=0.5)
    rev = jit_meta_gradient(mt, gen, form="reverse", **kw)(f_vars, g_vars, x, y)
    fwd = jit_meta_gradient(mt, gen, form="forward_over_reverse", **kw)(f_vars, g_vars, x, y)
    a = jax.flatten_util.ravel_pytree(rev.grad)[0]
    b = jax.flatten_util.ravel_pytree(fwd.grad)[0]
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 1e-5


def test_meta_step_updates_f_running_stats_once_and_g_stats():
    mt, gen, f_vars, g_vars, x, y = tiny_setup(jnp.float32)
    r = jit_meta_gradient(mt, gen, inner_lr=0.5)(f_vars, g_vars, x, y)
    # f's running statistics equal those of ONE train-mode forward at theta1 (not at theta1+).
    _, upd = mt.apply(f_vars, x, True, mutable=["batch_stats"])
    for a, b in zip(jax.tree_util.tree_leaves(r.multitask_batch_stats),
                    jax.tree_util.tree_leaves(upd["batch_stats"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    changed = [not np.allclose(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(r.generator_batch_stats),
        jax.tree_util.tree_leaves(g_vars["batch_stats"]))]
    assert all(changed)


def test_generator_gets_a_primary_signal_only_through_theta1_plus():
    """With entropy_weight 0 the meta-gradient is purely the mixed second-order term; it is not 0."""
    mt, gen, f_vars, g_vars, x, y = tiny_setup(jnp.float32)
    r = jit_meta_gradient(mt, gen, inner_lr=0.5, entropy_weight=0.0)(f_vars, g_vars, x, y)
    assert float(steps.global_norm(r.grad)) > 1e-6
    r0 = jit_meta_gradient(mt, gen, inner_lr=0.0, entropy_weight=0.0)(f_vars, g_vars, x, y)
    assert float(steps.global_norm(r0.grad)) == 0.0


def test_label_statistics_and_block_usage():
    psi = (2, 3)
    y = jnp.array([0, 0, 1, 1])
    one_hot = jnp.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 0, 0]], jnp.float32)
    s = maxl.label_statistics(one_hot, y, psi)
    np.testing.assert_allclose(float(s["label_entropy"]), 0.0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(s["primary_count"]), [2, 2])
    u = maxl.block_usage(s["soft_label_sum"], s["primary_count"], s["label_entropy_sum"], psi)
    # Class 0 uses both of its 2 aux classes equally; class 1 uses 1 of 3.
    np.testing.assert_allclose(np.asarray(u["usage_entropy"]), [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(u["effective_classes"]), [2.0, 1.0], rtol=1e-6)
    uniform = jnp.array([[.5, .5, 0, 0, 0]] * 2 + [[0, 0, 1 / 3, 1 / 3, 1 / 3]] * 2)
    s2 = maxl.label_statistics(uniform, y, psi)
    u2 = maxl.block_usage(s2["soft_label_sum"], s2["primary_count"], s2["label_entropy_sum"], psi)
    np.testing.assert_allclose(np.asarray(u2["label_entropy"]), np.log([2, 3]), rtol=1e-6)


def test_forward_over_reverse_equals_reverse_at_a_size_xla_once_miscompiled():
    """Small CNN, width 16, batch 100: XLA:CPU (jaxlib 0.10.2) compiled the forward-over-reverse
    meta-gradient into inf here until ``meta.unroll`` put an optimisation barrier on grad L_out."""
    psi = (5,) * 20
    mt, gen = models.make_networks("small", 20, 100, 100, width=16)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(100, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).integers(0, 20, 100))
    f_vars = jax.jit(mt.init, static_argnums=2)(jax.random.PRNGKey(0), x[:2], False)
    g_vars = jax.jit(gen.init, static_argnums=2)(jax.random.PRNGKey(1), x[:2], False)

    @jax.jit
    def both(f_vars, g_vars):
        return [jax.flatten_util.ravel_pytree(maxl.generator_meta_gradient(
            mt, gen, f_vars, g_vars, x, y, psi, inner_lr=0.01, form=form).grad)[0]
            for form in ("reverse", "forward_over_reverse")]

    rev, fwd = both(f_vars, g_vars)
    assert bool(jnp.all(jnp.isfinite(fwd)))
    assert float(jnp.linalg.norm(fwd - rev) / jnp.linalg.norm(rev)) < 1e-4


# ------------------------------------------------------------- the reference's first-order step

def test_authors_first_order_step_is_the_finite_difference_estimate_without_the_entropy_term():
    """``model_vgg_maxl_firstorder.py`` overwrites the generator's gradient with the difference, so
    its step equals our finite-difference form with the entropy term's gradient left out, at the
    same evaluation points (float64), and differs from it by exactly that gradient."""
    with enable_x64():
        mt, gen, f_vars, g_vars, x, y = tiny_setup()
        alpha = 0.3
        ref = jax.jit(lambda f, g: maxl.reference_first_order_meta_gradient(
            mt, gen, f, g, x, y, PSI, alpha=alpha))(f_vars, g_vars)
        fd = {w: jit_meta_gradient(mt, gen, inner_lr=alpha, form="finite_difference",
                                   entropy_weight=w)(f_vars, g_vars, x, y) for w in (0.0, 0.2)}
        flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0])  # noqa: E731
        np.testing.assert_allclose(flat(ref.grad), flat(fd[0.0].grad), rtol=1e-9, atol=1e-13)
        entropy_grad = jax.grad(lambda gp: 0.2 * losses.entropy_term(maxl.generate_labels(
            gen, {**g_vars, "params": gp}, x, y, PSI)[0]))(g_vars["params"])
        np.testing.assert_allclose(flat(fd[0.2].grad) - flat(ref.grad), flat(entropy_grad),
                                   rtol=1e-8, atol=1e-12)
        assert np.linalg.norm(flat(entropy_grad)) > 1e-6
        np.testing.assert_allclose(float(ref.meta_loss), float(fd[0.2].meta_loss), rtol=1e-12)


def test_authors_first_order_step_updates_batchnorm_statistics_three_times():
    """Every forward of the reference's first-order step runs in train mode: f's running
    statistics are updated at theta1, theta1 + eps v and theta1 - eps v in turn (g's at each of
    its three forwards); the exact form updates f's once."""
    with enable_x64():
        mt, gen, f_vars, g_vars, x, y = tiny_setup()
        alpha, radius = 0.3, 0.01
        ref = maxl.reference_first_order_meta_gradient(mt, gen, f_vars, g_vars, x, y, PSI,
                                                       alpha=alpha, radius=radius)
        exact = jit_meta_gradient(mt, gen, inner_lr=alpha)(f_vars, g_vars, x, y)
        soft, g1 = maxl.generate_labels(gen, g_vars, x, y, PSI)

        def loss(p, stats):
            return maxl.multitask_loss(mt, p, stats, x, y, soft)

        (_, (f1, _)), g = jax.value_and_grad(loss, has_aux=True)(f_vars["params"],
                                                                  f_vars["batch_stats"])
        plus = jax.tree_util.tree_map(lambda w, d: w - alpha * d, f_vars["params"], g)
        v = jax.grad(lambda p: losses.primary_focal_loss(mt.apply(
            {"params": p, "batch_stats": f_vars["batch_stats"]}, x, True,
            mutable=["batch_stats"])[0][0], y))(plus)
        eps = radius / np.linalg.norm(np.asarray(jax.flatten_util.ravel_pytree(v)[0]))
        stats, g_stats = f1, g1
        for sign in (1.0, -1.0):
            shifted = jax.tree_util.tree_map(lambda w, d: w + sign * eps * d, f_vars["params"], v)
            stats = loss(shifted, stats)[1][0]
            g_stats = maxl.generate_labels(gen, {**g_vars, "batch_stats": g_stats}, x, y, PSI)[1]
        flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0])  # noqa: E731
        np.testing.assert_allclose(flat(ref.multitask_batch_stats), flat(stats), rtol=1e-12)
        np.testing.assert_allclose(flat(ref.generator_batch_stats), flat(g_stats), rtol=1e-12)
        np.testing.assert_allclose(flat(exact.multitask_batch_stats), flat(f1), rtol=1e-12)
        assert np.max(np.abs(flat(stats) - flat(f1))) > 1e-6


def test_authors_first_order_alpha_is_theta1s_rate_halved_at_epoch_50_not_49():
    """The reference passes ``scheduler.get_last_lr()`` (theta1's StepLR(50)) as alpha; the exact
    step's alpha is halved one epoch earlier."""
    from experiments.configs import default
    from maxl_jax.methods import base
    from maxl_jax.methods.maxl import Maxl

    config = default.get_config()
    config.arch, config.width = "small", 2
    setup = base.Setup(num_primary=2, psi_human=None, steps_per_epoch=10)
    config.psi = (2, 2)
    alphas = {}
    for form in ("reverse", "reference_first_order"):
        config.meta_form = form
        m = Maxl.from_config(config, setup)
        alphas[form] = [float(m.inner_lr(epoch * 10)) for epoch in (0, 48, 49, 50)]
    assert alphas["reverse"] == [0.01, 0.01, 0.005, 0.005]
    assert alphas["reference_first_order"] == [0.01, 0.01, 0.01, 0.005]

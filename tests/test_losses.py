"""Mask softmax, focal loss and entropy term: the reference's formulas, stable on extreme logits."""

import jax
import jax.numpy as jnp
import numpy as np

from maxl_jax import hierarchy, losses

PSI = (5, 5, 5, 5)


def reference_mask_softmax(z, y, psi):
    mask = np.asarray(hierarchy.batch_mask(jnp.asarray(y), psi), np.float64)
    e = np.exp(np.asarray(z, np.float64)) * mask
    return e / e.sum(1, keepdims=True)


def test_mask_softmax_rows_sum_to_one_and_match_the_reference_formula():
    z = jnp.asarray(np.random.default_rng(0).normal(size=(64, 20)) * 3.0, jnp.float32)
    y = jax.random.randint(jax.random.PRNGKey(1), (64,), 0, 4)
    p = np.asarray(losses.mask_softmax(z, y, PSI))
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p, reference_mask_softmax(z, y, PSI), rtol=1e-5, atol=1e-12)


def test_mask_softmax_off_block_mass_is_below_1e6():
    z = jnp.asarray(np.random.default_rng(2).normal(size=(256, 20)), jnp.float32)
    y = jax.random.randint(jax.random.PRNGKey(3), (256,), 0, 4)
    p = np.asarray(losses.mask_softmax(z, y, PSI))
    off = 1.0 - np.asarray(hierarchy.batch_mask(y, PSI)) > 0.5
    off_mass = (p * off).sum(1)
    assert off_mass.max() < 1e-6
    assert off_mass.min() > 0.0  # the reference's 1e-8 mask keeps a tiny non-zero mass


def test_mask_softmax_is_finite_at_extreme_logits():
    z = jnp.array([[1e4, -1e4, 0.0, 1e4, -1e4] * 4, [-1e4] * 20], jnp.float32)
    y = jnp.array([1, 3])
    p = losses.mask_softmax(z, y, PSI)
    logp = losses.mask_log_softmax(z, y, PSI)
    assert np.all(np.isfinite(np.asarray(p))) and np.all(np.isfinite(np.asarray(logp)))
    np.testing.assert_allclose(np.asarray(p).sum(1), 1.0, rtol=1e-6)
    # Row 1 is uniform over its own block (5 classes of primary 3).
    np.testing.assert_allclose(np.asarray(p)[1, 15:], 0.2, rtol=1e-6)
    grad = jax.grad(lambda z: losses.entropy_term(losses.mask_softmax(z, y, PSI)))(z)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_focal_loss_against_hand_computed_values():
    # Two examples, three classes; probabilities known exactly.
    p = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    logits = jnp.log(jnp.asarray(p, jnp.float32))
    y_hard = jnp.array([0, 2])
    expected = ((1 - 0.7) ** 2 * -np.log(0.7) + (1 - 0.5) ** 2 * -np.log(0.5)) / 2
    np.testing.assert_allclose(float(losses.primary_focal_loss(logits, y_hard)), expected, rtol=1e-6)
    soft = jnp.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected_soft = (0.5 * 0.09 * -np.log(0.7) + 0.5 * 0.64 * -np.log(0.2)
                     + 0.25 * -np.log(0.5)) / 2
    np.testing.assert_allclose(float(losses.focal_loss(logits, soft)), expected_soft, rtol=1e-6)
    # gamma = 0 is the cross-entropy.
    np.testing.assert_allclose(float(losses.primary_focal_loss(logits, y_hard, gamma=0.0)),
                               (-np.log(0.7) - np.log(0.5)) / 2, rtol=1e-6)


def test_focal_loss_keeps_the_reference_1e20_floor():
    # p underflows to 0 in float32; the reference's log(p + 1e-20) floors the log at log(1e-20).
    logits = jnp.array([[0.0, 200.0]])
    value = float(losses.primary_focal_loss(logits, jnp.array([0])))
    np.testing.assert_allclose(value, -np.log(1e-20), rtol=1e-5)


def test_entropy_term_against_hand_value_and_minimal_at_uniform():
    probs = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    pbar = np.array([0.5, 1 / 6, 1 / 6, 1 / 6])
    np.testing.assert_allclose(float(losses.entropy_term(probs)),
                               np.sum(pbar * np.log(pbar + 1e-20)), rtol=1e-6)
    uniform = float(losses.entropy_term(jnp.full((3, 4), 0.25)))
    np.testing.assert_allclose(uniform, -np.log(4), rtol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.dirichlet(np.ones(4), size=8)
        assert float(losses.entropy_term(jnp.asarray(q, jnp.float32))) >= uniform - 1e-6


def test_batch_mean_over_an_axis_name_equals_the_global_mean():
    x = jnp.arange(16.0).reshape(8, 2)
    per_device = jax.vmap(lambda xs: losses.batch_mean(xs, "d"), axis_name="d")(x.reshape(4, 2, 2))
    np.testing.assert_allclose(np.asarray(per_device), np.tile(np.asarray(x.mean(0)), (4, 1)))

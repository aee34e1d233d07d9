"""The reference's learning-rate schedule, epoch by epoch (``model_vgg_maxl.py`` since its 2021
"update for pytorch 1.8" commit): its StepLR(50, 0.5) schedulers step at the end of each epoch, so
the theta1 and theta2 rates halve from epochs 50, 100 and 150; its inner step size halves at the
start of epochs 49, 99 and 149 (``if (index + 1) % 50 == 0``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maxl_jax import steps

STEPS_PER_EPOCH = 3


def rates_used(optimizer, updates: int) -> np.ndarray:
    """The step size of each of ``updates`` consecutive updates of a scalar with gradient 1."""
    params, state, out = jnp.zeros(()), optimizer.init(jnp.zeros(())), []
    update = jax.jit(lambda s: optimizer.update(jnp.ones(()), s, params))
    for _ in range(updates):
        u, state = update(state)
        out.append(-float(u))
    return np.asarray(out)


def test_theta1_theta2_and_inner_rates_follow_the_reference_epoch_by_epoch():
    f_opt, g_opt, inner = steps.reference_optimizers(STEPS_PER_EPOCH, lr=0.01, generator_lr=1e-3,
                                                     weight_decay=0.0)
    epochs = np.arange(200)
    f_rates = rates_used(f_opt, 200 * STEPS_PER_EPOCH).reshape(200, STEPS_PER_EPOCH)
    g_rates = rates_used(g_opt, 200 * STEPS_PER_EPOCH).reshape(200, STEPS_PER_EPOCH)
    # Every update of an epoch uses that epoch's rate.
    np.testing.assert_allclose(f_rates, np.repeat(0.01 * 0.5 ** (epochs // 50), 3).reshape(200, 3),
                               rtol=1e-6)
    np.testing.assert_allclose(g_rates, np.repeat(1e-3 * 0.5 ** (epochs // 50), 3).reshape(200, 3),
                               rtol=1e-6)
    alphas = np.array([[float(inner(e * STEPS_PER_EPOCH + k)) for k in range(STEPS_PER_EPOCH)]
                       for e in epochs])
    np.testing.assert_allclose(alphas, np.repeat(0.01 * 0.5 ** ((epochs + 1) // 50), 3)
                               .reshape(200, 3), rtol=1e-6)
    # The two halve one epoch apart: alpha first, at epoch 49; the optimizers at epoch 50.
    assert alphas[48, 0] == alphas[0, 0] and alphas[49, 0] == alphas[0, 0] / 2
    assert f_rates[49, -1] == f_rates[0, 0] and f_rates[50, 0] == f_rates[0, 0] / 2
    assert np.sum(np.diff(f_rates.ravel()) != 0) == 3  # halved exactly three times in 200 epochs


def test_step_lr_schedule_offset():
    s0 = steps.step_lr_schedule(1.0, steps_per_epoch=10, every=2)
    s1 = steps.step_lr_schedule(1.0, steps_per_epoch=10, every=2, offset=1)
    assert [float(s0(e * 10)) for e in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert [float(s1(e * 10)) for e in range(5)] == [1.0, 0.5, 0.5, 0.25, 0.25]

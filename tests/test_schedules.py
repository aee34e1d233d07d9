"""The reference's learning-rate schedule, epoch by epoch (``model_vgg_maxl.py`` since its 2021
"update for pytorch 1.8" commit): its StepLR(50, 0.5) schedulers step at the end of each epoch, so
the theta1 and theta2 rates halve from epochs 50, 100 and 150; its inner step size halves at the
start of epochs 49, 99 and 149 (``if (index + 1) % 50 == 0``). And the order of an epoch's steps
(``MetaSchedule``): a per-epoch meta pass after the training pass (MAXL) or before it (RL-AUX), with
the batches each meta step takes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from maxl_jax import steps, train
from maxl_jax.methods import MetaSchedule

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


def test_a_meta_pass_before_the_training_pass_and_its_batches():
    before = MetaSchedule(per_epoch_pass=True, pass_before=True, sources=("train", "random_train"))
    after = MetaSchedule(per_epoch_pass=True, sources=("train",))
    assert before.events(3) == [("meta", 0), ("meta", 1), ("meta", 2),
                                ("train", 0), ("train", 1), ("train", 2)]
    assert after.events(3) == [("train", 0), ("train", 1), ("train", 2),
                               ("meta", 0), ("meta", 1), ("meta", 2)]
    both = MetaSchedule(every=2, per_epoch_pass=True, pass_before=True, sources=("train",))
    assert both.events(4) == [("meta", 0), ("meta", 1), ("meta", 2), ("meta", 3), ("train", 0),
                              ("train", 1), ("meta", 4), ("train", 2), ("train", 3), ("meta", 5)]
    assert before.meta_steps_per_epoch(3) == 3
    with pytest.raises(ValueError, match="pass_before .* needs per_epoch_pass=True"):
        MetaSchedule(every=1, pass_before=True, sources=("train",))
    with pytest.raises(ValueError, match="no 'same' batch"):
        MetaSchedule(per_epoch_pass=True, pass_before=True, sources=("train", "same"))

    # The batches: the pass walks one shuffle of the training set, "random_train" another,
    # both fixed by the seed and the epoch (so a resumed run takes the same ones).
    config = ml_collections.ConfigDict({"batch_size": 4, "seed": 0})
    make = train._order_maker(40, None, 3, config, before)
    orders = make(0)
    taken = [orders.meta_indices(before.sources, j) for j in range(3)]
    passed = np.concatenate([t["train"] for t in taken])
    assert len(set(passed.tolist())) == 12  # one pass: no example twice
    np.testing.assert_array_equal(passed, orders.meta_train.ravel())
    extra = np.concatenate([t["random_train"] for t in taken])
    assert len(set(extra.tolist())) == 12 and not np.array_equal(extra, passed)
    assert not np.array_equal(extra, orders.train.ravel())
    np.testing.assert_array_equal(make(0).random_train, orders.random_train)
    assert not np.array_equal(make(1).random_train, orders.random_train)
    assert train._order_maker(40, None, 3, config, after)(0).random_train is None

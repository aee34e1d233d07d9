"""OL-AUX's options, ours (the defaults) and the authors' (``Xingyu-Lin/auxiliary-tasks-rl``,
``olaux/ddpg.py``; see ``maxl_jax/methods/olaux.py``), each checked against a hand computation on a
tiny network:

* ``reduce="sum"`` with beta b takes the weight step of ``"mean"`` with beta N b;
* ``smooth=K`` takes the product of the mean gradients of the last K steps (not the mean of the
  last K products), over fewer steps at the start;
* ``main_gradient="total"`` dots ``g_0 + sum_j w_j g_j`` with ``g_k``;
* ``log_losses`` trains on, and multiplies, the gradients of ``log L_pri`` and ``log(L_k + c)``;
* ``authors=True`` builds all of them from the config, refuses a field that contradicts it, leaves
  the defaults (and the default state, which checkpoints hold) as they were, and a run with it
  resumes from its checkpoint exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from experiments.configs import tiny
from maxl_jax import config_checks, losses, methods, train, validation
from maxl_jax.methods import AuxTask
from maxl_jax.methods.olaux import AUTHORS, LOG_FLOOR, OURS, OlAux
from test_methods import flat, make_batch, networks  # noqa: E402  (the same PSI and SHAPE)
from test_methods import PSI, SHAPE

TASKS = (AuxTask("random", PSI), AuxTask("random", (1, 1)))
LR = 0.05


def build(**fields):
    mt, _ = networks(sum(PSI) + 2)
    return OlAux(multitask=mt, multitask_optimizer=optax.sgd(LR), aux_tasks=TASKS,
                 initial_weights=(1.0, 0.5), lr=lambda count: LR, **fields)


def backbone_rows(grads):
    """``(1 + T, P)`` the task gradients over the backbone, flattened."""
    leaves = jax.tree_util.tree_leaves(grads["backbone"])
    return np.concatenate([np.asarray(g).reshape(g.shape[0], -1) for g in leaves], axis=1)


def run(m, n, seed=0):
    """``n`` training steps on batches 100.., with each step's task gradients at its state."""
    state = m.init(jax.random.PRNGKey(seed), SHAPE)
    step = jax.jit(m.train_step)
    rows, metrics, weights = [], [], []
    for i in range(n):
        batch = make_batch(100 + i, TASKS)
        _, grads, _, _ = m.task_gradients(state.multitask_params, state.multitask_batch_stats,
                                          batch)
        rows.append(backbone_rows(grads))
        state, out = step(state, batch)
        metrics.append(out)
        weights.append(np.asarray(state.method_state["weights"]))
    return state, rows, metrics, weights


# ------------------------------------------------------------------------------------- reduce

def test_authors_sum_with_beta_b_is_mean_with_beta_n_times_b():
    n, b = 3, 2.0
    _, _, m_sum, w_sum = run(build(every=n, beta=b, reduce="sum"), 2 * n)
    _, _, m_mean, w_mean = run(build(every=n, beta=n * b), 2 * n)
    _, _, _, w_small = run(build(every=n, beta=b), 2 * n)
    np.testing.assert_allclose(w_sum, w_mean, rtol=1e-5)
    # The first update by hand: w + b * lr * (sum of the first N products), clipped at 0.
    products = np.stack([np.asarray(o["gradient_products"]) for o in m_sum[:n]])
    np.testing.assert_allclose(w_sum[n - 1], np.maximum(np.array([1.0, 0.5])
                                                        + b * LR * products.sum(0), 0), rtol=1e-5)
    assert np.max(np.abs(w_sum[n - 1] - w_small[n - 1])) > 1e-4  # the sum is not the mean


# ------------------------------------------------------------------------------------- smooth

def test_authors_smoothing_takes_the_product_of_the_last_k_mean_gradients():
    k, n, steps = 4, 3, 7
    _, rows, metrics, weights = run(build(every=n, smooth=k), steps)
    expected = []
    for t in range(steps):
        window = np.stack(rows[max(0, t + 1 - k):t + 1])  # fewer than K at the start
        mean = window.mean(0)
        expected.append(mean[1:] @ mean[0])
        np.testing.assert_allclose(np.asarray(metrics[t]["gradient_products"]), expected[t],
                                   rtol=1e-4, atol=1e-9, err_msg=f"step {t}")
    # The weight steps use the smoothed products of their N steps (mean, beta 1: the defaults).
    expected = np.stack(expected)
    w = np.maximum(np.array([1.0, 0.5]) + LR * expected[:n].mean(0), 0)
    np.testing.assert_allclose(weights[n - 1], w, rtol=1e-5)
    w = np.maximum(w + LR * expected[n:2 * n].mean(0), 0)
    np.testing.assert_allclose(weights[2 * n - 1], w, rtol=1e-5)
    # Not the mean of the last K products (a different quantity).
    products = np.stack([r[1:] @ r[0] for r in rows])
    assert np.max(np.abs(products[k - 1:].reshape(-1) - expected[k - 1:].reshape(-1))) > 0
    assert not np.allclose(products[:k].mean(0), expected[k - 1], rtol=1e-3)


def test_authors_smoothing_with_k_1_is_the_default_products():
    _, _, a, wa = run(build(every=2), 4)
    _, _, b, wb = run(build(every=2, smooth=1), 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x["gradient_products"]),
                                      np.asarray(y["gradient_products"]))
    np.testing.assert_array_equal(wa, wb)


# ------------------------------------------------------------------------------ main gradient

def test_authors_total_main_gradient_dots_the_whole_weighted_gradient():
    steps = 4
    _, rows, metrics, weights = run(build(every=2, main_gradient="total"), steps)
    w = np.array([1.0, 0.5])
    for t in range(steps):
        total = rows[t][0] + w @ rows[t][1:]  # g_0 + sum_j w_j g_j at this step's weights
        got = np.asarray(metrics[t]["gradient_products"])
        np.testing.assert_allclose(got, rows[t][1:] @ total, rtol=1e-4, atol=1e-9)
        assert not np.allclose(got, rows[t][1:] @ rows[t][0], rtol=1e-3)  # not the primary's
        w = weights[t]


def test_authors_total_main_gradient_is_smoothed_with_the_weights_of_its_steps():
    k, steps = 3, 5
    _, rows, metrics, weights = run(build(every=2, beta=50.0, smooth=k, main_gradient="total"),
                                    steps)
    used = [np.array([1.0, 0.5])] + weights[:-1]  # the weights each step trained with
    assert not np.allclose(used[1], used[2])  # the weights moved inside the window
    mains = [r[0] + u @ r[1:] for r, u in zip(rows, used)]
    for t in range(steps):
        lo = max(0, t + 1 - k)
        main = np.mean(mains[lo:t + 1], axis=0)
        aux = np.mean([r[1:] for r in rows[lo:t + 1]], axis=0)
        np.testing.assert_allclose(np.asarray(metrics[t]["gradient_products"]), aux @ main,
                                   rtol=1e-4, atol=1e-9, err_msg=f"step {t}")


# --------------------------------------------------------------------------------- log losses

def log_objective(m, params, stats, batch, weights):
    """``log L_pri + sum_k w_k log(L_k + c)``, written out from the forward pass, and its terms."""
    logits, aux_logits, _ = m.forward(params, stats, batch["image"])
    primary = jnp.mean(m.primary_losses(logits, batch["primary"]))
    aux = jnp.mean(losses.task_focal_losses(aux_logits, m.data_targets(batch), m.aux_sizes,
                                            m.gamma), axis=0)
    terms = jnp.concatenate([jnp.log(primary)[None], jnp.log(aux + m.log_min_loss)])
    return terms[0] + jnp.sum(weights * terms[1:]), terms


def test_authors_log_losses_train_on_and_multiply_the_gradients_of_the_log_losses():
    m = build(every=3, log_losses=True, log_min_loss=0.02)
    state = m.init(jax.random.PRNGKey(0), SHAPE)
    batch = make_batch(7, TASKS)
    params, stats = state.multitask_params, state.multitask_batch_stats
    weights = jnp.asarray([1.0, 0.5])
    new, metrics = jax.jit(m.train_step)(state, batch)
    # The step is SGD on the log objective.
    grad = jax.grad(lambda p: log_objective(m, p, stats, batch, weights)[0])(params)
    np.testing.assert_allclose(flat(new.multitask_params) - flat(params), -LR * flat(grad),
                               rtol=1e-4, atol=2e-7)  # float32 rounding of theta + step - theta
    _, terms = log_objective(m, params, stats, batch, weights)
    np.testing.assert_allclose(float(metrics["loss"]), float(terms[0] + weights @ terms[1:]),
                               rtol=1e-5)
    # The products are those of the log terms' gradients, task by task, over the backbone.
    term_grads = jax.jacrev(lambda p: log_objective(m, p, stats, batch, weights)[1])(params)
    rows = backbone_rows(term_grads)
    np.testing.assert_allclose(np.asarray(metrics["gradient_products"]), rows[1:] @ rows[0],
                               rtol=1e-4, atol=1e-9)
    # ... which are not the plain losses' products.
    _, plain = jax.jit(build(every=3).train_step)(state, batch)
    assert not np.allclose(np.asarray(plain["gradient_products"]),
                           np.asarray(metrics["gradient_products"]), rtol=1e-2)
    # The offset: log(L_k + c), so a larger c gives smaller auxiliary products.
    _, big_c = jax.jit(build(every=3, log_losses=True, log_min_loss=1.0).train_step)(state, batch)
    ratio = np.asarray(big_c["gradient_products"]) / np.asarray(metrics["gradient_products"])
    aux = np.asarray(metrics["task_losses"])
    np.testing.assert_allclose(ratio, (aux + 0.02) / (aux + 1.0), rtol=1e-4)


def test_authors_log_of_the_primary_loss_is_floored():
    m = build(log_losses=True)
    terms = m.task_terms(jnp.asarray([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(np.asarray(terms), [np.log(LOG_FLOOR), np.log(0.02),
                                                   np.log(1.02)], rtol=1e-6)


# ----------------------------------------------------------------------- config and defaults

def olaux_config(**fields):
    c = tiny.get_config()
    c.method, c.aux_tasks = "olaux", "random"
    for k, v in fields.items():
        c.olaux[k] = v
    return c


SETUP = methods.Setup(num_primary=4, psi_human=None, steps_per_epoch=10)


def test_defaults_are_ours_and_keep_the_state_checkpoints_hold():
    assert {k: OlAux.defaults()[k] for k in OURS} == OURS
    assert OlAux.defaults()["authors"] is False and OlAux.defaults()["log_min_loss"] == 0.02
    c = olaux_config()
    config_checks.validate_config(c)
    m = OlAux.from_config(c, SETUP)
    assert (m.beta, m.reduce, m.smooth, m.log_losses, m.main_gradient) == (
        1.0, "mean", 1, False, "primary")
    state = m.init(jax.random.PRNGKey(0), (28, 28, 1))
    assert set(state.method_state) == {"weights", "dot_sum"}  # as before the options existed
    mode = OlAux.mode_of(c)
    assert mode["weight step"].endswith("(ours)") and mode["main gradient"].endswith("(ours)")


def test_authors_preset_builds_the_authors_settings_and_records_them():
    c = olaux_config(authors=True)
    config_checks.validate_config(c)
    m = OlAux.from_config(c, SETUP)
    assert {k: getattr(m, k) for k in AUTHORS} == AUTHORS
    assert m.every == c.olaux.every == 2 and m.log_min_loss == 0.02  # kept as given (tiny: 2)
    state = m.init(jax.random.PRNGKey(0), (28, 28, 1))
    history = state.method_state["grad_history"]
    params = state.multitask_params["backbone"]
    for h, p in zip(jax.tree_util.tree_leaves(history), jax.tree_util.tree_leaves(params)):
        assert h.shape == (4, 2, *p.shape)  # K steps x (primary + 1 auxiliary task)
    mode = OlAux.mode_of(c)
    assert all(mode[k].endswith("(the authors')") for k in
               ("weight step", "gradient smoothing", "log losses", "main gradient")), mode
    assert "= mean with beta 10" in mode["weight step"]  # 5 N, N = 2
    # Individual fields give the same method.
    c2 = olaux_config(**AUTHORS)
    config_checks.validate_config(c2)
    assert OlAux.settings(c2.olaux) == OlAux.settings(c.olaux)


@pytest.mark.parametrize("field,value,match", [
    ("smooth", 2, r"--config.olaux.smooth=2 conflicts with --config.olaux.authors=True"),
    ("reduce", "sum", r"--config.olaux.reduce='sum' conflicts"),
])
def test_authors_preset_refuses_a_field_it_would_override(field, value, match):
    c = olaux_config(authors=True, **{field: value})
    with pytest.raises(validation.ConfigError, match=match):
        config_checks.validate_config(c)


@pytest.mark.parametrize("field,value,match", [
    ("reduce", "median", r"--config.olaux.reduce='median' is not one of 'mean', 'sum'"),
    ("main_gradient", "aux", r"--config.olaux.main_gradient='aux' is not one of 'primary', "
                             r"'total'"),
    ("smooth", 0, r"--config.olaux.smooth=0 is out of range"),
    ("log_min_loss", -0.1, r"--config.olaux.log_min_loss=-0.1 is out of range"),
    ("beta", -1.0, r"--config.olaux.beta=-1.0 is out of range"),
])
def test_bad_option_values_name_the_field(field, value, match):
    with pytest.raises(validation.ConfigError, match=match):
        config_checks.validate_config(olaux_config(**{field: value}))


def test_authors_run_resumes_from_its_checkpoint_exactly(tmp_path):
    """Two epochs of 3 steps, the weights every 2 and the smoothing over 4 steps crossing the
    epoch: stopped after epoch 1 and resumed, the run ends where the uninterrupted one does."""
    from run_outputs import final_state, records

    def run_in_process(workdir, epochs):
        c = olaux_config(authors=True)
        c.dataset, c.primary_level, c.data_dir, c.epochs = "cifar100", 20, "", epochs
        c.aux_tasks = ""
        with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
            return train.train_and_evaluate(c, workdir, progress=False, log=lambda s: None)

    whole, split = tmp_path / "whole", tmp_path / "split"
    summary = run_in_process(whole, 2)
    run_in_process(split, 1)
    run_in_process(split, 2)
    a, b = final_state(whole), final_state(split)
    assert a.keys() == b.keys() and any("grad_history" in k for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert records(whole) == records(split)
    assert summary["mode"]["gradient smoothing"].endswith("(the authors')")

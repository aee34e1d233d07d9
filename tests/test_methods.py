"""Each method's maths on tiny networks: its meta-gradient against float64 finite differences, and a
behavioural property that can fail.

* GCS drops an auxiliary gradient whose cosine with the primary gradient is negative (and its step
  applies exactly that direction).
* OL-AUX's gradient products are the one-step lookahead derivative ``d/dw L_pri(theta - alpha g(w))``
  divided by ``-alpha`` (finite differences, alpha -> 0), and it raises the weight of an auxiliary
  loss aligned with the primary.
* WAMAL's exact meta-gradient (label and weight heads) matches float64 finite differences of the
  meta objective; its weights stay in ``[2^-r, 2^r]`` and its weight head receives a meta-gradient.
* AuxiLearn (both variants): the implicit hypergradient equals the same formula with every second
  derivative (the Hessian and the mixed derivative) replaced by float64 central differences of first
  derivatives. (The IFT itself, at an inner optimum, is checked against finite differences of
  ``L_A(theta*(phi))`` in test_estimators.py.) Its combiners stay monotone.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxl_jax import losses, maxl, methods, models
from maxl_jax.methods import AuxTask
from maxl_jax.methods.auxilearn import (AuxiLearn, AuxiLearnGenerate, clamp_combiner, combine,
                                        effective_weights, init_combiner)
from maxl_jax.methods.gcs import Gcs, gated_gradient
from maxl_jax.methods.olaux import OlAux
from maxl_jax.methods.wamal import Wamal
from compat import enable_x64

PSI = (2, 3)
SHAPE = (8, 8, 1)


def to64(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def networks(num_aux, width=2, head_width=8, weight_head=False):
    return models.make_networks("small", len(PSI), num_aux, num_aux, width=width,
                                head_width=head_width, conv_impl="xla",
                                generator_weight_head=weight_head)


def make_batch(seed, tasks=(), n=8):
    rng = np.random.default_rng(seed)
    primary = rng.integers(0, len(PSI), n)
    batch = {"image": jnp.asarray(rng.normal(size=(n, *SHAPE)), jnp.float32),
             "primary": jnp.asarray(primary, jnp.int32)}
    if tasks:
        cols = []
        for task in tasks:
            psi = np.asarray(task.psi)
            starts = np.concatenate([[0], np.cumsum(psi)[:-1]])
            cols.append(starts[primary] + rng.integers(0, 1 << 30, n) % psi[primary])
        batch["aux"] = jnp.asarray(np.stack(cols, 1), jnp.int32)
    return batch


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def test_registry_lists_every_method_and_names_the_choices_of_an_unknown_one():
    assert set(methods.names()) >= {"single", "human", "random", "maxl", "equal", "gcs", "olaux",
                                    "wamal", "auxilearn", "auxilearn_generate"}
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of .*maxl"):
        methods.get("nope")
    for name in methods.names():  # each names its paper (or the reference script) in its module
        assert len(methods.get(name).__module__) and methods.get(name).__doc__


# ------------------------------------------------------------------------------------------ GCS

def synthetic_grads():
    """Task gradients (primary, aligned auxiliary, opposed auxiliary) in a network-shaped tree."""
    rng = np.random.default_rng(0)
    g0, noise = rng.normal(size=6), rng.normal(size=6)
    backbone = np.stack([g0, g0 + 0.5 * noise, -g0 + 0.1 * noise])
    heads = rng.normal(size=(3, 4))
    return {"backbone": {"k": jnp.asarray(backbone)},
            "primary_head": {"k": jnp.asarray(heads[:, :2])},
            "auxiliary_head": {"k": jnp.asarray(heads[:, 2:])}}, backbone, heads


def test_gcs_drops_an_auxiliary_gradient_whose_cosine_with_the_primary_is_negative():
    grads, backbone, heads = synthetic_grads()
    direction, cosine, gate = gated_gradient(grads, jnp.ones(2))
    assert float(cosine[0]) > 0 > float(cosine[1])
    np.testing.assert_array_equal(np.asarray(gate), [1.0, 0.0])
    np.testing.assert_allclose(direction["backbone"]["k"], backbone[0] + backbone[1], rtol=1e-6)
    # The heads keep every task's own gradient.
    np.testing.assert_allclose(direction["auxiliary_head"]["k"], heads[:, 2:].sum(0), rtol=1e-6)
    # The weighted variant scales the kept gradient by its cosine.
    weighted, cos, _ = gated_gradient(grads, jnp.ones(2), weighted=True)
    np.testing.assert_allclose(weighted["backbone"]["k"],
                               backbone[0] + float(cos[0]) * backbone[1], rtol=1e-6)


def test_gcs_step_applies_the_gated_direction_of_its_task_gradients():
    tasks = (AuxTask("random", PSI), AuxTask("random", (1, 1)))
    mt, _ = networks(sum(PSI) + 2)
    m = Gcs(multitask=mt, multitask_optimizer=optax.sgd(0.1), aux_tasks=tasks, weights=(1.0, 0.5))
    state = m.init(jax.random.PRNGKey(0), SHAPE)
    batch = make_batch(1, tasks)
    new, metrics = jax.jit(m.train_step)(state, batch)
    _, grads, _, _ = m.task_gradients(state.multitask_params, state.multitask_batch_stats, batch)
    direction, cosine, _ = gated_gradient(grads, jnp.asarray([1.0, 0.5]))
    moved = flat(new.multitask_params) - flat(state.multitask_params)
    np.testing.assert_allclose(moved, -0.1 * flat(direction), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(metrics["cosine"]), np.asarray(cosine), rtol=1e-5)



def test_gcs_logs_per_task_the_fraction_of_gradients_passed_and_the_cosine():
    """Over several steps, the epoch mean of ``kept`` is the fraction of steps whose auxiliary
    gradient had a positive cosine with the primary's, per task, and the epoch line shows it and
    the mean cosine."""
    from maxl_jax import train

    tasks = (AuxTask("random", PSI), AuxTask("random", (1, 1)))
    mt, _ = networks(sum(PSI) + 2)
    m = Gcs(multitask=mt, multitask_optimizer=optax.sgd(0.1), aux_tasks=tasks, weights=(1.0, 1.0))
    state = m.init(jax.random.PRNGKey(0), SHAPE)
    step = jax.jit(m.train_step)
    kept, cosines = [], []
    for i in range(6):
        state, metrics = step(state, make_batch(10 + i, tasks))
        kept.append(np.asarray(metrics["kept"]))
        cosines.append(np.asarray(metrics["cosine"]))
    kept, cosines = np.stack(kept), np.stack(cosines)
    np.testing.assert_array_equal(kept, (cosines > 0).astype(np.float32))
    record = {"epoch": 0, "epoch_time": 1.0,
              "train": {"primary_loss": 1.0, "accuracy": 0.5, "kept": kept.mean(0).tolist(),
                        "cosine": cosines.mean(0).tolist()}}
    line = train._epoch_line(record, 1, m)
    expected = " ".join(f"{v:.2f}" for v in kept.mean(0))
    assert f"aux gradients passed {expected} | cosine " in line, line


# --------------------------------------------------------------------------------------- OL-AUX

def test_olaux_products_are_the_one_step_lookahead_derivative_of_the_primary_loss():
    """``d/dw_k L_pri(theta - alpha (g_0 + sum_j w_j g_j)) / (-alpha) -> <g_0, g_k>`` as alpha -> 0,
    by float64 central differences in ``w_k``: the quantity OL-AUX accumulates is that gradient."""
    with enable_x64():
        tasks = (AuxTask("random", PSI), AuxTask("random", (1, 1)))
        mt, _ = networks(sum(PSI) + 2)
        m = OlAux(multitask=mt, multitask_optimizer=optax.sgd(0.1), aux_tasks=tasks,
                  initial_weights=(1.0, 0.5), every=3)
        state = to64(m.init(jax.random.PRNGKey(0), SHAPE))
        batch = make_batch(2, tasks)
        _, metrics = jax.jit(m.train_step)(state, batch)
        products = np.asarray(metrics["gradient_products"])
        params, stats = state.multitask_params, state.multitask_batch_stats
        _, grads, _, _ = m.task_gradients(params, stats, batch)

        def primary_after(w, alpha):
            step = jax.tree_util.tree_map(
                lambda g: jnp.tensordot(jnp.concatenate([jnp.ones(1), w]), g, axes=1), grads)
            moved = jax.tree_util.tree_map(lambda p, g: p - alpha * g, params, step)
            logits, _, _ = m.forward(moved, stats, batch["image"])
            return jnp.mean(m.primary_losses(logits, batch["primary"]))

        f = jax.jit(primary_after)
        w0, eps = jnp.asarray([1.0, 0.5]), 1e-6
        errors = []
        for alpha in (1e-2, 1e-3, 1e-4):
            fd = np.array([(f(w0.at[k].add(eps), alpha) - f(w0.at[k].add(-eps), alpha))
                           / (2 * eps) / -alpha for k in range(2)])
            errors.append(np.max(np.abs(fd - products)) / np.max(np.abs(products)))
        # The difference is O(alpha): ten times smaller per decade of alpha.
        assert all(b < 0.2 * a for a, b in zip(errors, errors[1:])) and errors[-1] < 5e-3, errors
        assert np.all(np.abs(products) > 1e-6)


def test_olaux_raises_the_weight_of_an_auxiliary_loss_aligned_with_the_primary():
    # psi = (1, 1) and labels equal to the primary ones, on a head that starts as a copy of the
    # primary head: the auxiliary loss is the primary loss, so their backbone gradients align.
    tasks = (AuxTask("human", (1, 1)),)
    mt, _ = networks(2)
    m = OlAux(multitask=mt, multitask_optimizer=optax.sgd(0.05), aux_tasks=tasks,
              initial_weights=(1.0,), every=3, beta=10.0, lr=lambda count: 0.05)
    state = m.init(jax.random.PRNGKey(0), SHAPE)
    params = state.multitask_params
    state = state.replace(multitask_params={**params, "auxiliary_head": params["primary_head"]})
    step = jax.jit(m.train_step)
    products = []
    for i in range(3):
        batch = make_batch(10 + i)
        batch["aux"] = batch["primary"][:, None]
        state, metrics = step(state, batch)
        products.append(float(metrics["gradient_products"][0]))
        if i < 2:  # no update before the N-th step; the products accumulate
            assert float(state.method_state["weights"][0]) == 1.0
    assert all(p > 0 for p in products), products
    w = float(state.method_state["weights"][0])
    np.testing.assert_allclose(w, 1.0 + 10.0 * 0.05 * np.mean(products), rtol=1e-5)
    assert w > 1.0 and float(state.method_state["dot_sum"][0]) == 0.0


# ---------------------------------------------------------------------------------------- WAMAL

def wamal_setup():
    mt, gen = networks(sum(PSI), weight_head=True)
    m = Wamal(multitask=mt, multitask_optimizer=optax.sgd(0.01), generator=gen, psi=PSI,
              generator_optimizer=optax.sgd(1e-3))
    state = m.init(jax.random.PRNGKey(3), SHAPE)
    return m, state, make_batch(4)


def test_wamal_meta_gradient_equals_float64_finite_differences_and_reaches_the_weight_head():
    with enable_x64():
        m, state, batch = wamal_setup()
        state = to64(state)
        f_vars, g_vars = state.multitask_variables, m.generator_variables(state)
        x, y, alpha = batch["image"], batch["primary"], 0.5

        def objective(g_params):
            (soft, w), _ = maxl.generate_labels(m.generator, {**g_vars, "params": g_params}, x, y,
                                                PSI, weight_range=m.weight_range)
            inner = lambda p: maxl.multitask_loss(m.multitask, p, f_vars["batch_stats"], x, y, soft,  # noqa: E731
                                                  aux_example_weights=w)[0]
            plus = jax.tree_util.tree_map(lambda p, g: p - alpha * g, f_vars["params"],
                                          jax.grad(inner)(f_vars["params"]))
            (logits, _), _ = m.multitask.apply({"params": plus, "batch_stats": f_vars["batch_stats"]},
                                               x, True, mutable=["batch_stats"])
            return losses.primary_focal_loss(logits, y) + 0.2 * losses.entropy_term(soft)

        result = jax.jit(lambda f, g: maxl.generator_meta_gradient(
            m.multitask, m.generator, f, g, x, y, PSI, inner_lr=alpha,
            weight_range=m.weight_range))(f_vars, g_vars)
        np.testing.assert_allclose(float(result.meta_loss), float(objective(g_vars["params"])),
                                   rtol=1e-12)
        vec, unravel = jax.flatten_util.ravel_pytree(g_vars["params"])
        grad = flat(result.grad)
        f = jax.jit(lambda v: objective(unravel(v)))
        eps = 1e-6
        rng = np.random.default_rng(0)
        dirs = rng.normal(size=(16, vec.size))
        # Directions inside the weight head alone: the weights' path must be right by itself.
        head_only = flat(jax.tree_util.tree_map_with_path(
            lambda p, a: np.ones_like(a) if p[0].key == "weight_head" else np.zeros_like(a),
            g_vars["params"]))
        dirs = np.concatenate([dirs, dirs[:8] * head_only])
        fd = np.array([(f(vec + eps * d) - f(vec - eps * d)) / (2 * eps) for d in dirs])
        assert np.linalg.norm(dirs @ grad - fd) / np.linalg.norm(fd) < 1e-4
        assert np.linalg.norm(fd[16:]) > 1e-3 * np.linalg.norm(fd[:16])  # the head matters


def test_wamal_weights_stay_in_range_and_its_steps_train_both_generator_heads():
    m, state, batch = wamal_setup()
    extreme = jnp.asarray([-1e3, -3.0, 0.0, 2.0, 1e3])
    w = maxl.example_weights(extreme, 5.0)
    assert float(w.min()) >= 2.0 ** -5 - 1e-9 and float(w.max()) <= 2.0 ** 5 + 1e-6
    np.testing.assert_allclose(float(w[2]), 1.0)  # s = 1/2 gives weight 1
    np.testing.assert_allclose(float(jnp.mean(maxl.example_weights(extreme, 5.0, True))), 1.0,
                               rtol=1e-6)
    state, train_metrics = jax.jit(m.train_step)(state, batch)
    assert 2.0 ** -5 <= float(train_metrics["weight_min"]) <= float(train_metrics["weight_max"]) <= 32
    before = state.method_state["params"]["weight_head"]
    new, metrics = jax.jit(m.meta_step)(state, {"train": make_batch(5)})
    assert float(metrics["weight_head_grad_norm"]) > 1e-6
    assert float(jnp.max(jnp.abs(flat(new.method_state["params"]["weight_head"]) - flat(before)))) > 0



def test_wamal_authors_batch_weight_is_the_batch_mean_weight_times_the_mean_loss():
    """The authors' ``mean(L (B,) * w (B, 1))`` broadcasts to ``(B, B)``: ``weight_form="batch"``
    is exactly that, and differs from the per-example ``mean(w * L)`` when the weights vary."""
    m, state, batch = wamal_setup()
    (soft, w), _ = maxl.generate_labels(m.generator, m.generator_variables(state), batch["image"],
                                        batch["primary"], PSI, weight_range=m.weight_range)
    w = jnp.linspace(0.1, 8.0, w.shape[0])  # weights that differ between examples
    f_vars = state.multitask_variables
    (logits, aux_logits), _ = m.multitask.apply(f_vars, batch["image"], True,
                                                mutable=["batch_stats"])
    per_example = losses.focal_loss_per_example(jax.nn.log_softmax(aux_logits, -1), soft, 2.0)
    broadcast = jnp.mean(per_example * w[:, None])  # the authors' shapes
    parts = {form: maxl.multitask_loss(m.multitask, f_vars["params"], f_vars["batch_stats"],
                                       batch["image"], batch["primary"], soft,
                                       aux_example_weights=w, weight_form=form)[1][1]["auxiliary"]
             for form in ("batch", "example")}
    np.testing.assert_allclose(float(parts["batch"]), float(broadcast), rtol=1e-6)
    np.testing.assert_allclose(float(parts["example"]), float(jnp.mean(per_example * w)),
                               rtol=1e-6)
    assert abs(float(parts["batch"]) - float(parts["example"])) > 1e-3 * float(parts["example"])


def test_wamal_authors_batch_weight_with_normalisation_has_zero_weight_head_gradient():
    """Under the authors' batch form with their weight normalisation, ``mean(w / mean(w)) = 1``:
    the weights cancel and the weight head's meta-gradient is zero (to float64 round-off), while
    the label head's is not; without the normalisation the weight head does get a gradient."""
    with enable_x64():
        m, state, batch = wamal_setup()
        state = to64(state)
        f_vars, g_vars = state.multitask_variables, m.generator_variables(state)
        norms = {}
        for normalize in (True, False):
            result = maxl.generator_meta_gradient(
                m.multitask, m.generator, f_vars, g_vars, batch["image"], batch["primary"], PSI,
                inner_lr=0.5, weight_range=m.weight_range, normalize_weights=normalize,
                weight_form="batch")
            head = float(np.linalg.norm(flat(result.grad["weight_head"])))
            rest = float(np.linalg.norm(flat({k: v for k, v in result.grad.items()
                                              if k != "weight_head"})))
            norms[normalize] = (head, rest)
        head, rest = norms[True]
        assert rest > 1e-6 and head < 1e-12 * rest, norms
        assert norms[False][0] > 1e-6 * norms[False][1], norms


# ------------------------------------------------------------------------------------ AuxiLearn

def fd_implicit_hypergradient(m, state, batches, phi_vec, unravel_phi, build_phi, alpha, terms):
    """``-J^T sum_{j=0..J} (I - alpha H)^j v`` (the authors' Neumann convention) with ``H`` and ``J``
    from float64 central differences of first derivatives, ``v`` exact."""
    hess, mixed, v = fd_implicit_parts(m, state, batches, phi_vec, unravel_phi, build_phi)
    q, term = v.copy(), v.copy()
    for _ in range(terms):
        term = term - alpha * hess @ term
        q = q + term
    return -mixed.T @ q


def fd_implicit_parts(m, state, batches, phi_vec, unravel_phi, build_phi):
    """``(H, J, v)``: the training loss's Hessian in the shared weights and its mixed Jacobian in
    phi, by float64 central differences of first derivatives, and the held-out gradient ``v``."""
    held, batch = batches["held_out"], batches["train"]
    params, stats = state.multitask_params, state.multitask_batch_stats
    head = params["auxiliary_head"]
    shared = {k: v for k, v in params.items() if k != "auxiliary_head"}
    w_vec, unravel_w = jax.flatten_util.ravel_pytree(shared)

    def train_loss(wv, pv):
        phi, targets = build_phi(unravel_phi(pv))
        return m.training_loss({**unravel_w(wv), "auxiliary_head": head}, stats, batch, targets,
                               phi, None)[0]

    def held_loss(wv):
        logits, _, _ = m.forward({**unravel_w(wv), "auxiliary_head": head}, stats, held["image"])
        return jnp.mean(m.primary_losses(logits, held["primary"]))

    g = jax.jit(jax.grad(train_loss))
    eps = 1e-6
    eye_w, eye_p = np.eye(w_vec.size), np.eye(phi_vec.size)
    hess = np.stack([(g(w_vec + eps * e, phi_vec) - g(w_vec - eps * e, phi_vec)) / (2 * eps)
                     for e in eye_w], 1)
    mixed = np.stack([(g(w_vec, phi_vec + eps * e) - g(w_vec, phi_vec - eps * e)) / (2 * eps)
                      for e in eye_p], 1)
    return hess, mixed, np.asarray(jax.grad(held_loss)(w_vec))


@pytest.mark.parametrize("combiner", ["linear", "nonlinear"])
def test_auxilearn_hypergradient_matches_finite_difference_second_derivatives(combiner):
    with enable_x64():
        tasks = (AuxTask("random", PSI),)
        mt, _ = networks(sum(PSI), width=1, head_width=4)
        m = AuxiLearn(multitask=mt, multitask_optimizer=optax.sgd(0.01), aux_tasks=tasks,
                      meta_optimizer=optax.sgd(1e-3), combiner=combiner, hidden=(3,), alpha=0.3)
        state = to64(m.init(jax.random.PRNGKey(5), SHAPE))
        batches = {"held_out": make_batch(6), "train": make_batch(7, tasks)}
        grads, result, _ = jax.jit(m.hypergradient)(state, batches)
        comb = state.method_state["combiner"]
        phi_vec, unravel = jax.flatten_util.ravel_pytree(comb)
        targets = m.data_targets(batches["train"], jnp.float64)
        want = fd_implicit_hypergradient(m, state, batches, phi_vec, unravel,
                                         lambda c: (c, targets), 0.3, 3)
        got = flat(grads["combiner"])
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
        assert np.linalg.norm(want) > 1e-4


def test_auxilearn_damped_cg_is_the_implicit_gradient_of_the_damped_hessian():
    """``--config.auxilearn.solver=cg --config.auxilearn.damping=lambda``: with as many CG
    iterations as weights, the hypergradient is ``-J^T (H + lambda I)^-1 v`` exactly (lambda above
    ``-lambda_min(H)``, so the system is positive definite whatever ``H`` is), and differs from the
    undamped one."""
    with enable_x64():
        tasks = (AuxTask("random", PSI),)
        mt, _ = networks(sum(PSI), width=1, head_width=4)
        proto = AuxiLearn(multitask=mt, multitask_optimizer=optax.sgd(0.01), aux_tasks=tasks,
                          meta_optimizer=optax.sgd(1e-3))
        state = to64(proto.init(jax.random.PRNGKey(5), SHAPE))
        batches = {"held_out": make_batch(6), "train": make_batch(7, tasks)}
        comb = state.method_state["combiner"]
        phi_vec, unravel = jax.flatten_util.ravel_pytree(comb)
        targets = proto.data_targets(batches["train"], jnp.float64)
        hess, mixed, v = fd_implicit_parts(proto, state, batches, phi_vec, unravel,
                                           lambda c: (c, targets))
        hess = (hess + hess.T) / 2
        eig = np.linalg.eigvalsh(hess)
        damping = max(0.0, -eig[0]) + 0.1 * eig[-1]
        want = -mixed.T @ np.linalg.solve(hess + damping * np.eye(len(v)), v)
        m = AuxiLearn(multitask=mt, multitask_optimizer=optax.sgd(0.01), aux_tasks=tasks,
                      meta_optimizer=optax.sgd(1e-3), solver="cg", terms=2 * len(v),
                      damping=damping)
        got = flat(jax.jit(m.hypergradient)(state, batches)[0]["combiner"])
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
        undamped = -mixed.T @ np.linalg.lstsq(hess, v, rcond=None)[0]
        assert np.linalg.norm(undamped - want) > 0.1 * np.linalg.norm(want)


def test_auxilearn_generate_hypergradient_reaches_the_generator_and_matches_finite_differences():
    with enable_x64():
        mt, gen = networks(sum(PSI), width=1, head_width=4)
        m = AuxiLearnGenerate(multitask=mt, multitask_optimizer=optax.sgd(0.01), generator=gen,
                              psi=PSI, meta_optimizer=optax.sgd(1e-3), alpha=0.3)
        state = to64(m.init(jax.random.PRNGKey(8), SHAPE))
        batches = {"held_out": make_batch(9), "train": make_batch(10)}
        grads, _, _ = jax.jit(m.hypergradient)(state, batches)
        learned = {"combiner": state.method_state["combiner"],
                   "generator": state.method_state["generator"]}
        phi_vec, unravel = jax.flatten_util.ravel_pytree(learned)

        def build(phi):
            soft, _ = m._generate(state, batches["train"], None, phi["generator"])
            return phi["combiner"], soft

        want = fd_implicit_hypergradient(m, state, batches, phi_vec, unravel, build, 0.3, 3)
        got = flat(grads)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
        assert np.linalg.norm(flat(grads["generator"])) > 1e-6


def test_auxilearn_combiners_stay_monotone_and_the_meta_step_moves_them():
    per = jnp.asarray(np.random.default_rng(0).uniform(0, 2, size=(6, 3)))
    linear = init_combiner("linear", 3, jax.random.PRNGKey(0))
    # w = 1 and the skip connection: mean(l . 1) + mean(l_pri).
    np.testing.assert_allclose(float(combine(linear, per)),
                               float(per.sum(1).mean() + per[:, 0].mean()), rtol=1e-6)
    nonlinear = init_combiner("nonlinear", 3, jax.random.PRNGKey(1))
    bent = clamp_combiner(jax.tree_util.tree_map(lambda a: a - 0.15, nonlinear))
    assert all(float(v.min()) >= 0 for k, v in bent.items() if k.startswith("w"))
    assert np.all(np.asarray(effective_weights(bent, per)) >= 0)

    tasks = (AuxTask("random", PSI),)
    mt, _ = networks(sum(PSI))
    m = AuxiLearn(multitask=mt, multitask_optimizer=optax.sgd(0.01), aux_tasks=tasks,
                  meta_optimizer=optax.sgd(0.5), alpha=0.01, held_out_fraction=0.1,
                  schedule=methods.MetaSchedule(every=1, sources=("held_out", "train")))
    state = m.init(jax.random.PRNGKey(2), SHAPE)
    new, metrics = jax.jit(m.meta_step)(state, {"held_out": make_batch(11),
                                                "train": make_batch(12, tasks)})
    assert not np.allclose(flat(new.method_state["combiner"]), flat(state.method_state["combiner"]))
    assert float(jnp.min(new.method_state["combiner"]["w"])) >= 0
    assert int(new.meta_step) == 1 and np.isfinite(float(metrics["meta_loss"]))


def test_summary_names_the_mode_each_method_ran_in():
    """``summary.json`` records which behaviour the run followed where the paper, the authors'
    code and ours differ: the loss for every method, and each method's own choices."""
    from experiments.configs import default
    from maxl_jax import train

    config = default.get_config()
    record = [{"epoch": 0, "test": {"accuracy": 0.5, "loss": 1.0}, "epoch_time": 1.0}]
    config.method = "wamal"
    mode = train.summarize(record, config, 10)["mode"]
    assert mode["weight_form"].startswith("example") and mode["loss"] == "focal, gamma 2"
    config.wamal.weight_form, config.gamma = "batch", 0.0
    mode = train.summarize(record, config, 10)["mode"]
    assert mode["weight_form"] == "batch (the authors' code)", mode
    assert mode["loss"].startswith("cross-entropy"), mode
    config.method = "maoal"
    assert "(the authors')" in train.summarize(record, config, 10)["mode"]["loss"]
    config.method, config.meta_form = "maxl", "finite_difference"
    assert "first-order" in train.summarize(record, config, 10)["mode"]["meta_form"]


def test_rlaux_and_olaux_summaries_name_their_primary_phase_and_update_modes():
    from experiments.configs import default
    from maxl_jax import train

    config = default.get_config()
    record = [{"epoch": 0, "test": {"accuracy": 0.5, "loss": 1.0}, "epoch_time": 1.0}]
    config.method = "rlaux"
    assert train.summarize(record, config, 10)["mode"]["primary_weight"] == "argmax (the authors')"
    config.rlaux.primary_weight = "expected"
    assert train.summarize(record, config, 10)["mode"]["primary_weight"] == "expected (ours)"
    for name in ("auxilearn", "auxilearn_generate", "dtg"):
        config.method = name
        assert train.summarize(record, config, 10)["mode"]["hypergradient"] == (
            "Neumann J = 3, without the leading alpha, undamped (the authors')")
    config.dtg.solver, config.dtg.terms, config.dtg.damping = "cg", 30, 5.0
    config.method = "dtg"
    assert train.summarize(record, config, 10)["mode"]["hypergradient"] == (
        "CG, 30 iterations, damping 5")
    config.method = "olaux"
    mode = train.summarize(record, config, 10)["mode"]
    assert mode["weight step"] == "beta 1 x lr x mean of the 5 products (ours)"
    assert mode["main gradient"] == "primary loss (ours)"
    config.olaux.authors = True
    mode = train.summarize(record, config, 10)["mode"]
    assert mode["weight step"].endswith("sum of the 5 products (= mean with beta 25) (the authors')")
    assert mode["gradient smoothing"] == "mean gradients of the last 4 steps (the authors')"
    assert mode["log losses"].endswith("(the authors')")
    assert mode["main gradient"] == "whole weighted loss (the authors')"

"""DTG-AuxL (``maxl_jax.methods.dtg``) on tiny networks.

* The implicit part of the upper-level gradient equals the same Neumann formula (the authors'
  convention, without the leading alpha) with every second derivative (the Jacobian in theta of the
  lower level's update direction ``G = dL_T/dtheta``, over the backbone and primary head, and its
  derivative w.r.t. the generator) replaced by float64 central differences of ``G``, which is
  computed with the generated data as targets but regenerated from the perturbed theta's features,
  so the differences see the data move; ``v = dL_A/dtheta`` exact. The Jacobian enters transposed. This checks that the
  method feeds the estimator the right lower and upper losses; the IFT itself, at an inner optimum,
  is checked against finite differences of ``L_A(theta*(phi))`` in test_estimators.py.
* The explicit part is the gradient of the instance regulariser: float64 central differences of
  ``R`` along every generator parameter, and ``R``'s value against a NumPy transcription.
* Behaviour: generated labels sit inside their source's block of ``psi``; the generator (both its
  feature and its label part) gets a non-zero implicit hypergradient; with both regulariser weights
  0 the upper gradient is the implicit part alone, and otherwise implicit + grad R exactly; the
  training step leaves the generator alone and trains the backbone through the generated instances;
  the regulariser pulls generated features back to their sources; the decomposed forward equals
  the network's.
* Bad settings raise ``ConfigError`` naming the field.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import tiny
from maxl_jax import config_checks, methods, models, validation
from maxl_jax.methods.dtg import Dtg, JointGenerator
from compat import enable_x64

PSI = (2, 3)
SHAPE = (8, 8, 1)


def to64(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def make_method(width=1, head_width=4, hidden=3, **kw):
    mt, _ = models.make_networks("small", len(PSI), sum(PSI), sum(PSI), width=width,
                                 head_width=head_width, conv_impl="xla")
    return Dtg(multitask=mt, multitask_optimizer=optax.sgd(0.01),
               generator=JointGenerator(sum(PSI), hidden), psi=PSI,
               meta_optimizer=kw.pop("meta_optimizer", optax.sgd(1e-3)), **kw)


def make_batch(seed, n=8):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.normal(size=(n, *SHAPE)), jnp.float32),
            "primary": jnp.asarray(rng.integers(0, len(PSI), n), jnp.int32)}


# ------------------------------------------------------------------------- the hypergradient

def test_upper_gradient_is_the_implicit_part_plus_the_regulariser_gradient_both_checked():
    alpha, terms = 0.3, 3
    with enable_x64():
        m = make_method(alpha=alpha, terms=terms, proximity_weight=0.7, entropy_weight=0.3)
        state = to64(m.init(jax.random.PRNGKey(5), SHAPE))
        batches = {"held_out": to64(make_batch(6)), "train": to64(make_batch(7))}
        grads, implicit, explicit, _, _ = jax.jit(m.hypergradient)(state, batches)

        params, stats = state.multitask_params, state.multitask_batch_stats
        head = params["auxiliary_head"]
        shared = {k: v for k, v in params.items() if k != "auxiliary_head"}
        w_vec, unravel_w = jax.flatten_util.ravel_pytree(shared)
        gen = state.method_state["generator"]
        g_vec, unravel_g = jax.flatten_util.ravel_pytree(gen)
        train = batches["train"]

        def train_loss(wv, gv):
            return m.lower_loss({**unravel_w(wv), "auxiliary_head": head}, stats, train,
                                unravel_g(gv))[0]

        def held_loss(wv):
            logits, _, _ = m.forward({**unravel_w(wv), "auxiliary_head": head}, stats,
                                     batches["held_out"]["image"])
            return jnp.mean(m.primary_losses(logits, batches["held_out"]["primary"]))

        # The implicit part: every second derivative by central differences of G = dL_T/dtheta.
        g = jax.jit(jax.grad(train_loss))
        eps = 1e-6
        jac = np.stack([(g(w_vec + eps * e, g_vec) - g(w_vec - eps * e, g_vec)) / (2 * eps)
                        for e in np.eye(w_vec.size)], 1)
        mixed = np.stack([(g(w_vec, g_vec + eps * e) - g(w_vec, g_vec - eps * e)) / (2 * eps)
                          for e in np.eye(g_vec.size)], 1)
        v = np.asarray(jax.jit(jax.grad(held_loss))(w_vec))
        q, term = v.copy(), v.copy()
        for _ in range(terms):  # J^T: G's Jacobian is not symmetric (the data move with theta)
            term = term - alpha * jac.T @ term
            q = q + term
        want = -mixed.T @ q
        got = flat(implicit)
        assert np.linalg.norm(want) > 1e-4
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
        # Both parts of the joint generator receive a hypergradient.
        assert np.linalg.norm(flat(implicit["feature"])) > 1e-6
        assert np.linalg.norm(flat(implicit["label"])) > 1e-6

        # The explicit part: R on the training batch's real features, by central differences.
        h = jax.jit(m.features)(params, stats, train["image"])[0]
        r = jax.jit(lambda gv: m.regulariser(unravel_g(gv), h, train["primary"])[0])
        fd = np.asarray([(r(g_vec + eps * e) - r(g_vec - eps * e)) / (2 * eps)
                         for e in np.eye(g_vec.size)])
        assert np.linalg.norm(fd) > 1e-3
        assert np.linalg.norm(flat(explicit) - fd) / np.linalg.norm(fd) < 1e-7
        # And the upper gradient is their sum.
        np.testing.assert_allclose(flat(grads), flat(implicit) + flat(explicit), rtol=1e-12,
                                   atol=1e-15)


def test_regulariser_value_is_its_definition_with_the_padding_left_out():
    m = make_method(proximity_weight=0.7, entropy_weight=0.3)
    state = m.init(jax.random.PRNGKey(1), SHAPE)
    batch = make_batch(2)
    mask = jnp.asarray([1, 1, 1, 0, 1, 1, 0, 1], jnp.float32)
    gen = state.method_state["generator"]

    @jax.jit
    def pieces(params, stats):
        h = m.features(params, stats, batch["image"])[0]
        return h, m.generate(gen, h, batch["primary"]), m.regulariser(gen, h, batch["primary"],
                                                                      None, mask)[0]

    h, (delta, soft), value = pieces(state.multitask_params, state.multitask_batch_stats)
    keep = np.asarray(mask) > 0
    h, delta, soft = np.asarray(h)[keep], np.asarray(delta)[keep], np.asarray(soft)[keep]
    proximity = np.mean(np.sum(delta ** 2, 1)) / np.mean(np.sum(h ** 2, 1))
    pbar = soft.mean(0)
    np.testing.assert_allclose(float(value), 0.7 * proximity + 0.3 * np.sum(pbar * np.log(pbar)),
                               rtol=1e-5)


def test_with_both_regulariser_weights_0_the_upper_gradient_is_the_implicit_part_alone():
    m = make_method(proximity_weight=0.0, entropy_weight=0.0)
    state = m.init(jax.random.PRNGKey(3), SHAPE)
    batches = {"held_out": make_batch(4), "train": make_batch(5)}
    grads, implicit, explicit, _, _ = jax.jit(m.hypergradient)(state, batches)
    assert np.all(flat(explicit) == 0)
    np.testing.assert_array_equal(flat(grads), flat(implicit))
    assert np.linalg.norm(flat(implicit)) > 1e-6


# ------------------------------------------------------------------------------- behaviour

def test_generated_labels_sit_in_their_source_primary_class_block():
    m = make_method()
    state = m.init(jax.random.PRNGKey(0), SHAPE)
    batch = make_batch(8, n=16)

    @jax.jit
    def generated(params, stats, gen):
        h = m.features(params, stats, batch["image"])[0]
        return (h, *m.generate(gen, h, batch["primary"]))

    h, delta, soft = generated(state.multitask_params, state.multitask_batch_stats,
                               state.method_state["generator"])
    soft, primary = np.asarray(soft), np.asarray(batch["primary"])
    starts = np.concatenate([[0], np.cumsum(PSI)[:-1]])
    inside = np.zeros_like(soft, bool)
    for i, c in enumerate(primary):
        inside[i, starts[c]:starts[c] + PSI[c]] = True
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    assert soft[~inside].max() < 1e-6
    assert soft[inside].min() > 1e-4  # a soft label over the block, not a hard one at init
    assert delta.shape == h.shape and float(jnp.abs(delta).max()) > 0


def test_training_step_keeps_the_generator_and_trains_the_backbone_through_generated_data():
    m = make_method()
    state = m.init(jax.random.PRNGKey(1), SHAPE)
    batch = make_batch(9)
    new, metrics = jax.jit(m.train_step)(state, batch)
    np.testing.assert_array_equal(flat(new.method_state), flat(state.method_state))
    assert int(new.step) == 1 and float(metrics["auxiliary_loss"]) > 0

    @jax.jit
    def check(params, stats, gen):
        # The generated-data loss alone reaches the backbone (through the anchor h~ = h + delta).
        aux_grad = jax.grad(lambda p: m.lower_loss(p, stats, batch, gen)[1][2]["auxiliary"])(params)
        logits, aux_logits, new_stats = m.forward(params, stats, batch["image"])
        h, stats2 = m.features(params, stats, batch["image"])
        return (aux_grad, (logits, aux_logits, new_stats),
                (m.head(params, "primary", h), m.head(params, "auxiliary", h), stats2))

    aux_grad, whole, parts = check(state.multitask_params, state.multitask_batch_stats,
                                   state.method_state["generator"])
    assert np.linalg.norm(flat(aux_grad["backbone"])) > 1e-6
    assert np.all(flat(aux_grad["primary_head"]) == 0)
    # The decomposed forward (backbone, then each head) is the network's own.
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(parts)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_the_proximity_term_pulls_generated_features_back_to_their_sources():
    m = make_method(proximity_weight=100.0, entropy_weight=0.0, hidden=8,
                    meta_optimizer=optax.adam(3e-2))
    state = m.init(jax.random.PRNGKey(2), SHAPE)
    batches = {"held_out": make_batch(10), "train": make_batch(11)}
    step = jax.jit(m.meta_step)
    state, first = step(state, batches)
    for _ in range(5):
        state, last = step(state, batches)  # each reports R's parts before its update
    assert int(state.meta_step) == 6
    assert float(first["proximity"]) > 0
    assert float(last["proximity"]) < 0.5 * float(first["proximity"])
    assert float(first["explicit_norm"]) > float(first["implicit_norm"]) > 0


# ------------------------------------------------------------------------------- settings

def dtg_config(**fields):
    c = tiny.get_config()
    c.method = "dtg"
    for k, v in fields.items():
        c.dtg[k] = v
    return c


@pytest.mark.parametrize("field, value, match", [
    ("every", 0, r"--config.dtg.every=0 is out of range"),
    ("held_out_fraction", 0.0, r"--config.dtg.held_out_fraction=0.0 is out of range"),
    ("held_out_fraction", 0.95, r"--config.dtg.held_out_fraction=0.95 is out of range"),
    ("meta_lr", 0.0, r"--config.dtg.meta_lr=0.0 is out of range"),
    ("clip", -1.0, r"--config.dtg.clip=-1.0 is out of range"),
    ("proximity_weight", -0.5, r"--config.dtg.proximity_weight=-0.5 is out of range"),
    ("hidden", -1, r"--config.dtg.hidden=-1 is out of range"),
    ("terms", -1, r"--config.dtg.terms=-1 is out of range"),
])
def test_bad_settings_raise_a_config_error_naming_the_field(field, value, match):
    with pytest.raises(validation.ConfigError, match=match):
        config_checks.validate_config(dtg_config(**{field: value}))


def test_good_settings_build_and_bad_constructions_are_refused():
    config = dtg_config(hidden=5)
    config_checks.validate_config(config)
    setup = methods.Setup(num_primary=2, psi_human=None, steps_per_epoch=4, dataset="test")
    config.psi = PSI
    m = methods.build(config, setup)
    assert isinstance(m, Dtg) and m.generator.hidden == 5 and m.psi == PSI
    assert m.held_out_fraction == 0.25 and m.schedule.every == 1  # the tiny config's
    assert methods.get("dtg").held_out_fraction_of(config) == 0.25
    mt, _ = models.make_networks("small", 2, 4, 4, width=1, head_width=4)
    with pytest.raises(ValueError, match=r"need sum\(psi\) = 5 outputs"):
        Dtg(multitask=mt, multitask_optimizer=optax.sgd(0.1), generator=JointGenerator(5, 3),
            psi=PSI, meta_optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="proximity_weight must be >= 0"):
        make_method(proximity_weight=-1.0)
    with pytest.raises(ValueError, match="'held_out' and a 'train' batch"):
        make_method(schedule=methods.MetaSchedule(every=1, sources=("train",)))

"""RL-AUX (``maxl_jax.methods.rlaux``): its PPO pieces on hand-checkable numbers, its weight bins and
targets, its config errors, and the agent on a toy problem:

* GAE's advantages and returns equal the recursion worked by hand, with an episode end, with padding
  transitions skipped, and reduce to Monte-Carlo returns at discount = lambda = 1;
* PPO's clipped objective, its parts and its gradient (zero for a clipped sample) by hand;
* the minibatch cut is the same for a rollout padded with masked transitions;
* the RL phase trains a copy of the network, continued through the pass and restarted from the
  network at the next pass, and leaves the network itself alone;
* on a toy problem where one auxiliary labelling measurably helps the primary loss after the update,
  the policy's preference moves toward that labelling; on the mirrored toy, where the other
  labelling gets exactly that reward, it moves away from it;
* the primary phase's weight: by default the authors' argmax (the most likely bin's weight, which
  for a fresh softmax-feature policy is one bin for every image), or the expected weight
  ``sum_b pi(b|x) 2^(8 w_b - 3)``, or a sampled bin's weight, each entering the loss per example.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import default
from maxl_jax import config_checks, models, validation
from maxl_jax.methods import rlaux
from maxl_jax.methods.rlaux import Policy, RlAux

PSI = (2, 2)
SHAPE = (8, 8, 1)


# ------------------------------------------------------------------------------ weights, targets


def test_weight_bins_map_w_in_0_to_1_to_2_to_the_8w_minus_3():
    w = np.asarray(rlaux.bin_weights(21))
    assert w.shape == (21,)
    np.testing.assert_allclose(w[[0, 5, 10, 15, 20]], [1 / 8, 0.5, 2.0, 8.0, 32.0], rtol=1e-6)
    np.testing.assert_allclose(w[1:] / w[:-1], 2 ** 0.4, rtol=1e-6)  # w steps by 0.05
    np.testing.assert_allclose(np.asarray(rlaux.bin_weights(3)), [1 / 8, 2.0, 32.0], rtol=1e-6)


def test_targets_and_choices_stay_inside_the_primary_block():
    primary = jnp.asarray([0, 1, 1])
    labels = jnp.asarray([1, 2, 3])
    soft = np.asarray(rlaux.auxiliary_targets(labels, primary, (2, 3)))
    e = np.e
    # The mask softmax of the one-hot choice: e against 1 for the block's other classes.
    np.testing.assert_allclose(soft[0], [1 / (e + 1), e / (e + 1), 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(soft[2], [0, 0, 1 / (e + 2), e / (e + 2), 1 / (e + 2)], rtol=1e-6)
    hard = np.asarray(rlaux.auxiliary_targets(labels, primary, (2, 3), soft=False))
    np.testing.assert_array_equal(hard, np.eye(5)[[1, 2, 3]])
    lp = rlaux.block_log_probs(jnp.asarray([[1.0, 2.0, 3.0, 4.0, 5.0]] * 3), primary, (2, 3))
    p = np.exp(np.asarray(lp))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    assert np.all(p[0, 2:] == 0) and np.all(p[1:, :2] == 0)
    np.testing.assert_allclose(np.asarray(rlaux.categorical_entropy(lp))[0],
                               -np.sum(p[0, :2] * np.log(p[0, :2])), rtol=1e-6)


# ------------------------------------------------------------------------------------ GAE, PPO


def test_gae_equals_the_recursion_by_hand():
    r, v = jnp.asarray([0.0, 0.0, 1.0]), jnp.asarray([0.5, 0.2, 0.4])
    adv, ret = rlaux.gae(r, v, 0.3, jnp.zeros(3), discount=0.9, gae_lambda=0.5)
    # delta_2 = 1 + 0.9 * 0.3 - 0.4 = 0.87; delta_1 = 0.9 * 0.4 - 0.2 = 0.16;
    # delta_0 = 0.9 * 0.2 - 0.5 = -0.32; A_t = delta_t + 0.45 A_{t+1}.
    np.testing.assert_allclose(np.asarray(adv), [-0.071825, 0.5515, 0.87], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), [0.428175, 0.7515, 1.27], rtol=1e-5)
    # The episode ends after the last transition: no bootstrap.
    adv, _ = rlaux.gae(r, v, 0.3, jnp.asarray([0.0, 0.0, 1.0]), 0.9, 0.5)
    np.testing.assert_allclose(np.asarray(adv), [-0.1265, 0.43, 0.6], rtol=1e-5)
    # An episode end in the middle cuts the recursion there.
    adv, _ = rlaux.gae(r, v, 0.3, jnp.asarray([1.0, 0.0, 0.0]), 0.9, 0.5)
    np.testing.assert_allclose(np.asarray(adv), [-0.5, 0.5515, 0.87], rtol=1e-5)
    # Discount = lambda = 1: Monte-Carlo returns (future rewards plus the bootstrap).
    adv, ret = rlaux.gae(r, v, 0.3, jnp.zeros(3), 1.0, 1.0)
    np.testing.assert_allclose(np.asarray(ret), [1.3, 1.3, 1.3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adv), 1.3 - np.asarray(v), rtol=1e-6)


def test_gae_skips_padding_transitions():
    r, v = jnp.asarray([0.0, 0.0, 1.0]), jnp.asarray([0.5, 0.2, 0.4])
    want, want_ret = rlaux.gae(r, v, 0.3, jnp.zeros(3), 0.9, 0.5)
    # Padding at the end and in the middle, with garbage rewards and values.
    adv, ret = rlaux.gae(jnp.asarray([0.0, 7.0, 0.0, 1.0, 5.0]),
                         jnp.asarray([0.5, -3.0, 0.2, 0.4, 9.0]), 0.3, jnp.zeros(5), 0.9, 0.5,
                         valid=jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0]))
    np.testing.assert_allclose(np.asarray(adv)[[0, 2, 3]], np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ret)[[0, 2, 3]], np.asarray(want_ret), rtol=1e-6)
    assert float(adv[1]) == float(adv[4]) == float(ret[1]) == float(ret[4]) == 0.0


def test_ppo_clipped_objective_by_hand():
    old = jnp.zeros(3)
    new = jnp.log(jnp.asarray([1.5, 0.5, 1.1]))   # ratios 1.5, 0.5, 1.1
    adv = jnp.asarray([1.0, -2.0, 1.0])
    values, returns = jnp.asarray([0.0, 1.0, 2.0]), jnp.asarray([1.0, 1.0, 0.0])
    entropy = jnp.asarray([1.0, 3.0, 2.0])
    loss, parts = rlaux.ppo_loss(new, old, adv, values, returns, entropy, clip=0.2, vf_coef=0.5,
                                 ent_coef=0.01)
    # Surrogates: min(1.5, 1.2) = 1.2; min(-1, 0.8 * -2) = -1.6; min(1.1, 1.1) = 1.1.
    np.testing.assert_allclose(float(parts["policy_loss"]), -(1.2 - 1.6 + 1.1) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(parts["value_loss"]), (1 + 0 + 4) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(parts["policy_entropy"]), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(loss), -0.7 / 3 + 0.5 * 5 / 3 - 0.01 * 2, rtol=1e-6)
    np.testing.assert_allclose(float(parts["clip_fraction"]), 2 / 3, rtol=1e-6)
    kl = [0.5 - np.log(1.5), -0.5 - np.log(0.5), 0.1 - np.log(1.1)]
    np.testing.assert_allclose(float(parts["approx_kl"]), np.mean(kl), rtol=1e-5)
    # The clipped samples get no policy gradient; the unclipped one -ratio * A / n.
    grad = jax.grad(lambda lp: rlaux.ppo_loss(lp, old, adv, values, returns, entropy)[1][
        "policy_loss"])(new)
    np.testing.assert_allclose(np.asarray(grad), [0.0, 0.0, -1.1 / 3], rtol=1e-6, atol=1e-7)
    # A weight-0 sample changes nothing.
    pad = lambda x, y: jnp.concatenate([x, jnp.asarray([y])])
    loss_w, _ = rlaux.ppo_loss(pad(new, 3.0), pad(old, 0.0), pad(adv, 9.0), pad(values, 5.0),
                               pad(returns, -5.0), pad(entropy, 4.0),
                               weights=jnp.asarray([1.0, 1.0, 1.0, 0.0]))
    np.testing.assert_allclose(float(loss_w), float(loss), rtol=1e-6)


def test_advantage_normalisation_and_minibatches_ignore_padding():
    a = jnp.asarray([1.0, 2.0, 3.0, 100.0])
    z = np.asarray(rlaux.normalize(a, jnp.asarray([1.0, 1.0, 1.0, 0.0])))
    np.testing.assert_allclose(z[:3], [-1.0, 0.0, 1.0], rtol=1e-6)  # torch.std: Bessel-corrected
    key = jax.random.PRNGKey(3)
    orders = jax.jit(rlaux.minibatch_orders, static_argnums=(2, 3))
    idx, w = orders(key, jnp.ones(30), 2, 10)
    idx_p, w_p = orders(key, jnp.concatenate([jnp.ones(30), jnp.zeros(2)]), 2, 10)
    assert idx.shape == (2, 3, 10) and idx_p.shape == (2, 4, 10)
    for e in range(2):  # each epoch a permutation of the transitions, cut into minibatches
        assert sorted(np.asarray(idx[e]).ravel().tolist()) == list(range(30))
    assert not np.array_equal(np.asarray(idx[0]), np.asarray(idx[1]))
    np.testing.assert_array_equal(np.asarray(idx_p[:, :3]), np.asarray(idx))
    np.testing.assert_array_equal(np.asarray(w_p[:, :3]), 1.0)
    np.testing.assert_array_equal(np.asarray(w_p[:, 3]), 0.0)  # padding only: skipped
    # A rollout smaller than the minibatch is one minibatch.
    idx, w = orders(key, jnp.ones(7), 1, 100)
    assert idx.shape == (1, 1, 7) and float(jnp.sum(w)) == 7


# ------------------------------------------------------------------------------------ config


def rlaux_config(**fields):
    """The default config with ``--method=rlaux`` and ``fields`` of its section replaced (of any
    type, as a program could set them)."""
    c = default.get_config()
    c.method = "rlaux"
    c.rlaux = ml_collections.ConfigDict({**RlAux.defaults(), **fields})
    return c


@pytest.mark.parametrize("field, value, match", [
    ("weight_bins", 1, r"rlaux.weight_bins=1 is out of range: it must be >= 2"),
    ("ppo_lr", 0.0, r"rlaux.ppo_lr=0.0 is out of range"),
    ("ppo_epochs", 0, r"rlaux.ppo_epochs=0 is out of range"),
    ("ppo_batch", 0, r"rlaux.ppo_batch=0 is out of range"),
    ("clip", 0.0, r"rlaux.clip=0.0 is out of range"),
    ("discount", 1.5, r"rlaux.discount=1.5 is out of range: it must be >= 0 and <= 1"),
    ("gae_lambda", -0.1, r"rlaux.gae_lambda=-0.1 is out of range"),
    ("entropy_reward", -1.0, r"rlaux.entropy_reward=-1.0 is out of range"),
    ("weight_aware", "yes", r"rlaux.weight_aware='yes' is not True or False"),
    ("normalize_advantage", 1, r"rlaux.normalize_advantage=1 is not True or False"),
    ("primary_weight", "mean", r"rlaux.primary_weight='mean' is not one of 'argmax', 'expected', "
                               r"'sample'"),
])
def test_bad_settings_raise_a_config_error_naming_the_field(field, value, match):
    config = rlaux_config(**{field: value})
    with pytest.raises(validation.ConfigError, match=match):
        config_checks.validate_config(config)


def test_default_settings_are_the_authors_weight_aware_ppo():
    config = rlaux_config()
    config_checks.validate_config(config)
    d = RlAux.defaults()
    assert d["weight_aware"] is True and d["weight_bins"] == 21
    assert (d["ppo_lr"], d["ent_coef"], d["ppo_epochs"], d["ppo_batch"]) == (3e-4, 0.01, 10, 100)
    assert d["entropy_reward"] == 0.2
    assert d["primary_weight"] == "argmax"  # their primary phase: predict(deterministic=True)
    from maxl_jax import methods
    setup = methods.Setup(num_primary=20, psi_human=None, steps_per_epoch=500)
    config.arch, config.width = "small", 4
    m = methods.build(config, setup)
    assert m.schedule.pass_before and m.schedule.sources == ("train", "random_train")
    assert m.policy.weight_bins == 21 and m.psi == (5,) * 20 and m.steps_per_epoch == 500
    assert m.primary_weight == "argmax"
    config.rlaux.primary_weight = "expected"
    assert methods.build(config, setup).primary_weight == "expected"
    config.rlaux.weight_aware = False
    assert methods.build(config, setup).policy.weight_bins == 0


# ---------------------------------------------------------------------------------- the toy


def toy_method():
    """Two primary classes, two auxiliary classes each; tiny networks; the copy restarts from the
    same network at every meta step (``steps_per_epoch=1``), so the reward depends on the actions
    alone; no entropy bonus; one-hot targets; Monte-Carlo advantages."""
    backbone = models.ConvBackbone(filters=(4,), convs_per_block=(1,), global_pool=True,
                                   conv_impl="xla")  # one conv layer: quick to compile
    mt = models.MultiTaskNet(2, 4, backbone, head_width=8)
    policy = Policy(num_auxiliary=4, weight_bins=0, backbone=backbone, head_width=8,
                    feature_dim=8)
    return RlAux(multitask=mt, multitask_optimizer=optax.sgd(1.0), policy=policy, psi=PSI,
                 policy_optimizer=optax.adam(1e-2), steps_per_epoch=1, weight_aware=False,
                 soft_target=False, entropy_reward=0.0, discount=1.0, gae_lambda=1.0,
                 ppo_epochs=4, ppo_batch=4)


def toy_batch(seed, n):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, *SHAPE)) + 0.45 * (2 * y - 1)[:, None, None, None]
    return {"image": jnp.asarray(x, jnp.float32), "primary": jnp.asarray(y, jnp.int32)}


def mirrored(state, sign):
    """The auxiliary head made the primary head's mirror: class ``2c`` of block ``c`` scores like
    primary class ``c`` (times ``sign``), class ``2c + 1`` like its negative. ``sign = -1`` swaps
    the roles of the two labellings exactly."""
    p = state.multitask_params
    head = p["primary_head"]
    w, b = head["out"]["kernel"], head["out"]["bias"]
    kernel = sign * jnp.stack([w[:, 0], -w[:, 0], w[:, 1], -w[:, 1]], 1)
    bias = sign * jnp.stack([b[0], -b[0], b[1], -b[1]])
    aux = {"hidden": head["hidden"], "out": {"kernel": kernel, "bias": bias}}
    return state.replace(multitask_params={**p, "auxiliary_head": aux})


def test_the_policy_moves_toward_the_auxiliary_labelling_that_helps():
    m = toy_method()
    start = m.init(jax.random.PRNGKey(0), SHAPE)
    batch, reward_batch = toy_batch(1, 4), toy_batch(2, 16)
    first = 2 * batch["primary"]  # the first class of each example's block; the other: first + 1

    def copy_of(s):
        return {"params": s.multitask_params, "batch_stats": s.multitask_batch_stats,
                "opt_state": s.multitask_opt_state}

    reward = jax.jit(lambda s, labels: m.environment_step(copy_of(s), batch, reward_batch, labels,
                                                          jnp.zeros_like(labels))[1])
    toy, swapped = mirrored(start, 1.0), mirrored(start, -1.0)
    r_first, r_second = float(reward(toy, first)), float(reward(toy, first + 1))
    # Known: one labelling (here the first class of every example's block, as the mirror is
    # meant to make it) helps the primary loss after the update, by a wide margin ...
    assert abs(r_first - r_second) > 0.1, (r_first, r_second)
    helpful = first if r_first > r_second else first + 1
    # ... and the mirrored toy gives the other labelling exactly that reward.
    np.testing.assert_allclose(float(reward(swapped, first)), r_second, rtol=1e-5)
    np.testing.assert_allclose(float(reward(swapped, first + 1)), r_first, rtol=1e-5)

    @jax.jit
    def helpful_probability(policy_variables):
        (logits, _, _), _ = m.policy.apply(policy_variables, batch["image"], True,
                                           mutable=["batch_stats"])
        lp = rlaux.block_log_probs(logits, batch["primary"], PSI)
        return jnp.mean(jnp.exp(jnp.take_along_axis(lp, helpful[:, None], -1)))

    def preference(s):  # the mean probability of the helpful labelling, as the policy acts
        return float(helpful_probability(s.method_state["policy"]))

    meta_step = jax.jit(m.meta_step)

    def train(s, updates=150):
        for i in range(updates):  # new actions each update: the key moves on
            s, metrics = meta_step(s.replace(rng=jax.random.fold_in(start.rng, i)),
                                   {"train": batch, "random_train": reward_batch})
            s = s.replace(meta_step=jnp.zeros((), jnp.int32))
        return s, metrics

    before = preference(toy)
    assert 0.35 < before < 0.65  # no preference yet
    after, metrics = train(toy)
    assert preference(after) > before + 0.25, (before, preference(after))
    assert float(metrics["copy_loss"]) > 0 and np.isfinite(float(metrics["ppo_loss"]))
    # The network itself is untouched by the RL phase: only the copy trains.
    np.testing.assert_array_equal(np.asarray(after.multitask_params["auxiliary_head"]["out"]
                                             ["kernel"]),
                                  np.asarray(toy.multitask_params["auxiliary_head"]["out"]
                                             ["kernel"]))
    # The control: where the other labelling earns that reward, the preference moves away.
    after_swapped, _ = train(swapped)
    assert preference(after_swapped) < before - 0.25, (before, preference(after_swapped))


def test_the_rl_phase_trains_a_copy_restarted_from_the_network_at_each_epochs_start():
    m = dataclasses.replace(toy_method(), steps_per_epoch=2, ppo_epochs=1)
    s0 = mirrored(m.init(jax.random.PRNGKey(0), SHAPE), 1.0)
    batches = {"train": toy_batch(1, 4), "random_train": toy_batch(2, 16)}
    step = jax.jit(m.meta_step)
    copy_params = lambda s: flat(s.method_state["copy"]["params"])
    s1, _ = step(s0, batches)  # the pass's first step: the copy is the network, one step on
    s2, _ = step(s1, batches)  # its second step continues the copy
    np.testing.assert_array_equal(flat(s2.multitask_params), flat(s0.multitask_params))
    assert int(s2.meta_step) == 2 and int(s2.step) == 0
    # At position 1 the copy in the state is what trains: from the network instead, it differs.
    from_network = s1.replace(method_state={**s1.method_state, "copy": {
        "params": s1.multitask_params, "batch_stats": s1.multitask_batch_stats,
        "opt_state": s1.multitask_opt_state}})
    assert not np.allclose(copy_params(s2), copy_params(step(from_network, batches)[0]))
    # At the next pass's first step the old copy is dropped: the same policy and key from s0's
    # state (meta step 2) give the same copy, whatever copy the state held.
    fresh = s0.replace(meta_step=jnp.asarray(2, jnp.int32))
    stale = s2.replace(method_state={**s0.method_state, "copy": s2.method_state["copy"]})
    np.testing.assert_array_equal(copy_params(step(stale, batches)[0]),
                                  copy_params(step(fresh, batches)[0]))


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def test_the_meta_step_under_shard_map_gathers_the_batch_and_equals_the_jit_step():
    """Inside ``shard_map`` (``axis_name``) every device gathers the whole batch and runs the same
    step; on a one-device mesh here (8 devices: ``tests/multidevice_check.py`` runs the jit path)."""
    from maxl_jax import parallel
    m = dataclasses.replace(toy_method(), steps_per_epoch=2, ppo_epochs=1,
                            policy_optimizer=optax.chain(optax.clip_by_global_norm(0.5),
                                                         optax.adam(3e-4, eps=1e-5)))
    s0 = m.init(jax.random.PRNGKey(0), SHAPE)
    batches = {"train": toy_batch(1, 4), "random_train": toy_batch(2, 8)}
    mesh = parallel.make_mesh(jax.devices()[:1])
    mapped, mapped_metrics = parallel.shard_map_step(m.meta_step, mesh)(s0, batches)
    plain, plain_metrics = jax.jit(m.meta_step)(s0, batches)
    np.testing.assert_allclose(float(mapped_metrics["reward"]), float(plain_metrics["reward"]),
                               rtol=1e-6)
    np.testing.assert_allclose(flat(mapped.method_state), flat(plain.method_state), rtol=1e-5,
                               atol=1e-7)


# ------------------------------------------------------------------------ the primary phase


def two_to_the_8w_minus_3(bins=21):
    """The authors' mapping, written out: bin ``b`` -> ``w = b / (bins - 1)`` -> ``2^(8 w - 3)``."""
    return np.asarray([2.0 ** (8.0 * b / (bins - 1) - 3.0) for b in range(bins)])


def bins_of(weights, table):
    """Each weight's bin, asserting it is that bin's weight (to float32 rounding)."""
    weights = np.asarray(weights, np.float64)
    bins = np.abs(np.log(weights)[:, None] - np.log(table)[None, :]).argmin(-1)
    np.testing.assert_allclose(weights, table[bins], rtol=1e-5)
    return bins


def test_primary_phase_weights_argmax_expected_and_sampled_by_hand():
    table = two_to_the_8w_minus_3(3)  # 1/8, 2, 32
    p = np.asarray([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    lp = jnp.log(jnp.asarray(p, jnp.float32))
    # argmax: the weight of the most likely bin.
    np.testing.assert_allclose(np.asarray(rlaux.primary_phase_weights(lp, "argmax")),
                               [1 / 8, 32.0, 2.0], rtol=1e-6)
    # expected: sum_b p_b * 2^(8 w_b - 3).
    np.testing.assert_allclose(np.asarray(rlaux.primary_phase_weights(lp, "expected")), p @ table,
                               rtol=1e-6)
    # sample: each draw is one bin's weight, and over many draws the mean is the expected weight.
    n = 20000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draws = np.asarray(jax.jit(rlaux.primary_phase_weights, static_argnums=1)(
        jnp.repeat(lp[1:2], n, 0), "sample", keys))
    bins = bins_of(draws, table)
    np.testing.assert_allclose(draws.mean(), (p @ table)[1], rtol=0.03)
    np.testing.assert_allclose(np.bincount(bins, minlength=3) / n, p[1], atol=0.015)
    with pytest.raises(ValueError, match="unknown primary_weight"):
        rlaux.primary_phase_weights(lp, "mean")


def primary_phase_method(primary_weight="argmax"):
    """A weight-aware tiny RL-AUX with the authors' 21 bins and 256 softmax features."""
    backbone = models.ConvBackbone(filters=(4,), convs_per_block=(1,), global_pool=True,
                                   conv_impl="xla")
    mt = models.MultiTaskNet(2, 4, backbone, head_width=8)
    policy = Policy(num_auxiliary=4, weight_bins=21, backbone=backbone, head_width=8,
                    feature_dim=256)
    return RlAux(multitask=mt, multitask_optimizer=optax.sgd(0.1), policy=policy, psi=PSI,
                 policy_optimizer=optax.adam(1e-3), steps_per_epoch=1, weight_aware=True,
                 weight_bins=21, primary_weight=primary_weight)


def policy_weight_probabilities(m, state, images):
    """``pi(b|x)`` as the primary phase acts (the policy's running BatchNorm statistics)."""
    _, weight_logits, _ = m.policy.apply(state.method_state["policy"], images, False)
    return np.asarray(jax.nn.softmax(weight_logits, -1), np.float64)


def primary_auxiliary_loss(m, state, batch, weights):
    """The auxiliary term of the primary phase's loss with per-example ``weights``."""
    label_logits, weight_logits, _ = m.policy.apply(state.method_state["policy"], batch["image"],
                                                    False)
    labels = jnp.argmax(rlaux.block_log_probs(label_logits, batch["primary"], PSI), -1)
    targets = rlaux.auxiliary_targets(labels, batch["primary"], PSI)
    _, (_, parts) = m.training_loss(state.multitask_params, state.multitask_batch_stats, batch,
                                    targets, jnp.asarray(weights, jnp.float32))
    return float(parts["auxiliary"])


def test_authors_primary_phase_weight_is_the_most_likely_bins_one_bin_for_every_image():
    m = primary_phase_method()
    assert m.primary_weight == "argmax"  # the default, theirs
    state = m.init(jax.random.PRNGKey(0), SHAPE)
    batch = toy_batch(3, 16)
    p = policy_weight_probabilities(m, state, batch["image"])
    want = two_to_the_8w_minus_3()[p.argmax(-1)]
    _, metrics = jax.jit(m.train_step)(state, batch)
    np.testing.assert_allclose(float(metrics["weight_mean"]), want.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["auxiliary_loss"]),
                               primary_auxiliary_loss(m, state, batch, want), rtol=1e-5)
    # The finding, in the authors' form: the softmax features make the policy near uniform
    # (entropy within 0.1% of ln 21) yet its argmax is one bin for every image.
    entropy = -np.sum(p * np.log(p), -1)
    np.testing.assert_allclose(entropy, np.log(21), rtol=1e-3)
    assert len(np.unique(p.argmax(-1))) == 1, p.argmax(-1)


def test_expected_weight_option_is_sum_over_bins_of_pi_times_2_to_the_8w_minus_3():
    m = primary_phase_method("expected")
    state = m.init(jax.random.PRNGKey(0), SHAPE)
    batch = toy_batch(3, 16)
    p = policy_weight_probabilities(m, state, batch["image"])
    want = p @ two_to_the_8w_minus_3()  # per example
    got = np.asarray(m.primary_weights(jnp.log(jnp.asarray(p, jnp.float32)), state))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    _, metrics = jax.jit(m.train_step)(state, batch)
    np.testing.assert_allclose(float(metrics["weight_mean"]), want.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["auxiliary_loss"]),
                               primary_auxiliary_loss(m, state, batch, want), rtol=1e-5)
    # Near uniform, the expected weight is near the bins' mean weight (about 6.3), not 32 or 1/8.
    np.testing.assert_allclose(want, two_to_the_8w_minus_3().mean(), rtol=0.01)


def test_sampled_weight_option_draws_a_bin_per_example_from_the_policy():
    m = primary_phase_method("sample")
    state = m.init(jax.random.PRNGKey(0), SHAPE)
    batch = toy_batch(3, 64)
    lp = jnp.log(jnp.asarray(policy_weight_probabilities(m, state, batch["image"]), jnp.float32))
    weights = jax.jit(m.primary_weights)
    w0 = np.asarray(weights(lp, state))
    bins = bins_of(w0, two_to_the_8w_minus_3())  # each example gets one bin's weight ...
    assert len(np.unique(bins)) > 5  # ... drawn per example from the near-uniform policy
    np.testing.assert_array_equal(np.asarray(weights(lp, state)), w0)  # the key is the state's
    later = np.asarray(weights(lp, state.replace(step=state.step + 1)))
    assert not np.array_equal(later, w0)  # a new draw at the next step
    # The train step uses exactly those weights, per example.
    _, metrics = jax.jit(m.train_step)(state, batch)
    np.testing.assert_allclose(float(metrics["weight_mean"]), w0.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["auxiliary_loss"]),
                               primary_auxiliary_loss(m, state, batch, w0), rtol=1e-5)

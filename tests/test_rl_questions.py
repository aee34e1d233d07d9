"""Discovery of useful questions (maxl_jax.rl): Catch's dynamics, the meta-gradient of the question
network against float64 central finite differences, reproducibility from a seed, and the no-aux
baseline's answer loss having no effect on theta."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from compat import enable_x64
from maxl_jax.rl import envs
from maxl_jax.rl import questions as q


# ------------------------------------------------------------------------------------ Catch

def _play(keys, actions):
    """Runs ``envs.step`` (vmapped) for the 9 steps of an episode; returns the per-step states,
    rewards, dones and observations, stacked on a leading time axis."""
    state, obs0 = jax.jit(jax.vmap(envs.reset))(keys)
    states, rewards, dones, observations = [state], [], [], [obs0]
    step = jax.jit(jax.vmap(envs.step))
    for t in range(envs.EPISODE_LENGTH):
        state, ts = step(state, actions[:, t])
        states.append(state)
        rewards.append(ts.reward)
        dones.append(ts.done)
        observations.append(ts.obs)
    stack = lambda xs: np.stack([np.asarray(x) for x in xs])  # noqa: E731
    states = jax.tree_util.tree_map(lambda *xs: stack(xs), *states)
    return states, stack(rewards), stack(dones), stack(observations)


def test_catch_ball_falls_one_row_per_step_and_reward_is_plus_one_iff_caught():
    n = 256
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    actions = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (n, envs.EPISODE_LENGTH), 0, 3))
    states, rewards, dones, observations = _play(keys, jnp.asarray(actions))
    # reset: ball in row 0 at a random column (all 5 appear), paddle in the middle
    assert np.all(states.ball_y[0] == 0) and np.all(states.paddle_x[0] == envs.COLUMNS // 2)
    assert set(np.unique(states.ball_x[0])) == set(range(envs.COLUMNS))
    # the ball falls exactly one row per step and keeps its column
    np.testing.assert_array_equal(states.ball_y, np.arange(envs.EPISODE_LENGTH + 1)[:, None]
                                  * np.ones((1, n), int))
    assert np.all(states.ball_x == states.ball_x[0])
    # the paddle follows action - 1, clipped at the walls
    paddle = np.full(n, envs.COLUMNS // 2)
    for t in range(envs.EPISODE_LENGTH):
        paddle = np.clip(paddle + actions[:, t] - 1, 0, envs.COLUMNS - 1)
        np.testing.assert_array_equal(states.paddle_x[t + 1], paddle)
    # reward and termination only on the 9th step, +1 iff the paddle is under the ball
    assert not dones[:-1].any() and dones[-1].all()
    assert np.all(rewards[:-1] == 0.0)
    caught = states.paddle_x[-1] == states.ball_x[-1]
    np.testing.assert_array_equal(rewards[-1], np.where(caught, 1.0, -1.0))
    assert 0 < caught.sum() < n  # both outcomes occur under random actions
    # the board: the ball's and the paddle's pixels are 1, nothing else
    boards = observations.reshape(envs.EPISODE_LENGTH + 1, n, envs.ROWS, envs.COLUMNS)
    for t in range(envs.EPISODE_LENGTH + 1):
        expect = np.zeros((n, envs.ROWS, envs.COLUMNS))
        expect[np.arange(n), states.ball_y[t], states.ball_x[t]] = 1.0
        expect[np.arange(n), envs.ROWS - 1, states.paddle_x[t]] = 1.0
        np.testing.assert_array_equal(boards[t], expect)


def test_catch_autoreset_returns_terminal_board_and_starts_a_new_episode():
    state, _ = envs.reset(jax.random.PRNGKey(3))
    for t in range(envs.EPISODE_LENGTH):
        plain, plain_ts = envs.step(state, jnp.int32(1))
        state, ts = envs.step_autoreset(state, jnp.int32(1))
        np.testing.assert_array_equal(ts.next_obs, plain_ts.obs)
        assert bool(ts.done) == (t == envs.EPISODE_LENGTH - 1)
    # after the terminal step: the next observation is a fresh episode's, the terminal board kept
    assert int(state.ball_y) == 0 and int(state.t) == 0
    np.testing.assert_array_equal(ts.obs, envs.observe(state))
    assert ts.next_obs.reshape(envs.ROWS, envs.COLUMNS)[envs.ROWS - 1].sum() >= 1
    assert int(plain.ball_y) == envs.ROWS - 1


# ------------------------------------------------------------------------------------ meta-gradient

TINY = dict(num_envs=4, unroll=3, hidden=8, num_questions=2, question_hidden=4,
            learning_rate=0.05, questions="discovered")


_rollout = jax.jit(q.rollout, static_argnums=4)
_update = jax.jit(q.agent_update, static_argnums=4)


def _tiny_setup(cfg, n_trajs):
    """theta after one update (a carried, non-fresh Adam state), eta, and ``n_trajs`` unrolls."""
    k_theta, k_eta, k_env, k_run = jax.random.split(jax.random.PRNGKey(0), 4)
    theta = q.init_agent(k_theta, cfg)
    eta = q.init_questions(k_eta, cfg)
    opt_state = q.agent_optimizer(cfg).init(theta)
    env_state, obs = jax.jit(q.init_envs, static_argnums=1)(k_env, cfg.num_envs)
    trajs = []
    for i in range(n_trajs + 1):
        env_state, obs, traj = _rollout(theta, env_state, obs, jax.random.fold_in(k_run, i), cfg)
        trajs.append(traj)
    theta, opt_state, _ = _update(theta, opt_state, eta, trajs[0], cfg)
    return theta, opt_state, eta, trajs[1:]


def _held_objective(theta, opt_state, eta0, cfg, inner, outer):
    """``eta -> L_RL(theta_k(eta); outer)`` with every stop-gradient quantity (bootstraps,
    advantages) of every update and of the outer loss held at its value at ``eta0``: the function
    whose exact derivative (Q4) says the meta-gradient is."""
    refs, p, s = [], theta, opt_state
    for traj in inner:
        refs.append(p)
        p, s, _ = _update(p, s, eta0, traj, cfg)
    refs.append(p)

    def f(e):
        p, s = theta, opt_state
        for traj, ref in zip(inner, refs):
            p, s, _ = q.agent_update(p, s, e, traj, cfg, targets_theta=ref)
        return q.actor_critic_loss(p, outer, cfg, targets_theta=refs[-1])[0]
    return jax.jit(f)


@pytest.mark.parametrize("k,representation", [(1, "shared"), (2, "shared"), (1, "answers")])
def test_meta_gradient_of_eta_matches_float64_central_differences(k, representation):
    with enable_x64():
        cfg = q.Config(**TINY, meta_steps=k, representation=representation)
        theta, opt_state, eta, trajs = _tiny_setup(cfg, k + 1)
        inner, outer = trajs[:k], trajs[k]
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *inner)
        loss, grad = jax.jit(lambda e: q.meta_gradient(theta, opt_state, e, stacked, outer,
                                                       cfg))(eta)
        f = _held_objective(theta, opt_state, eta, cfg, inner, outer)
        np.testing.assert_allclose(loss, f(eta), rtol=1e-12)
        flat, unravel = jax.flatten_util.ravel_pytree(eta)
        g = jax.flatten_util.ravel_pytree(grad)[0]
        assert jnp.all(jnp.isfinite(g)) and float(jnp.linalg.norm(g)) > 0
        h = 1e-6
        rng = np.random.default_rng(1)
        # along random directions and along the 4 coordinates with the largest derivatives
        dirs = [rng.normal(size=flat.shape) for _ in range(3)]
        for i in np.argsort(-np.abs(np.asarray(g)))[:4]:
            e_i = np.zeros(flat.shape)
            e_i[i] = 1.0
            dirs.append(e_i)
        for d in dirs:
            d = jnp.asarray(d)
            fd = (f(unravel(flat + h * d)) - f(unravel(flat - h * d))) / (2 * h)
            exact = jnp.dot(g, d)
            scale = float(jnp.linalg.norm(g) * jnp.linalg.norm(d))
            assert abs(float(fd - exact)) <= 1e-6 * scale, (float(fd), float(exact))


def test_one_step_library_meta_gradient_equals_the_unrolled_scan():
    """k = 1 goes through maxl_jax.meta.meta_gradient with the carried Adam state; the scan form
    used for k > 1 gives the same gradient at k = 1."""
    with enable_x64():
        cfg = q.Config(**TINY)
        theta, opt_state, eta, trajs = _tiny_setup(cfg, 2)
        stacked = jax.tree_util.tree_map(lambda x: x[None], trajs[0])
        lib = jax.jit(q.meta_gradient, static_argnums=5)(theta, opt_state, eta, stacked,
                                                           trajs[1], cfg)
        scan = jax.jit(q.unrolled_meta_gradient, static_argnums=5)(theta, opt_state, eta, stacked,
                                                                   trajs[1], cfg)
        np.testing.assert_allclose(lib[0], scan[0], rtol=1e-12)
        for a, b in zip(jax.tree_util.tree_leaves(lib[1]), jax.tree_util.tree_leaves(scan[1])):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-15)


# ------------------------------------------------------------------------------------ baselines

def test_no_aux_answer_loss_gives_zero_gradient_to_theta():
    """questions="none": the agent's gradient is the actor-critic loss's alone, exactly (the answer
    head gets 0 and Adam leaves it unchanged); with hand-designed questions it is not."""
    # "none" and "hand" have the same theta (a 50-question answer head) and the same unrolls
    theta, _, eta, (traj,) = _tiny_setup(q.Config(**{**TINY, "questions": "hand"}), 1)
    for kind in ("none", "hand"):
        cfg = q.Config(**{**TINY, "questions": kind})
        eta = q.init_questions(jax.random.PRNGKey(0), cfg)

        def parts(p, s):
            return (jax.grad(lambda p: q.agent_loss(p, eta, traj, cfg)[0])(p),
                    jax.grad(lambda p: q.actor_critic_loss(p, traj, cfg)[0])(p),
                    q.answer_loss(p, eta, traj, cfg)[0],
                    q.agent_update(p, s, eta, traj, cfg)[0])
        # a fresh Adam state: the setup's update ("hand") left momentum in the answer head
        fresh = q.agent_optimizer(cfg).init(theta)
        g_total, g_rl, ans, new_theta = jax.jit(parts)(theta, fresh)
        assert float(ans) > 0  # the answer loss itself is not zero: only its weight is
        same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree_util.tree_leaves(g_total),
                                                              jax.tree_util.tree_leaves(g_rl)))
        answers_zero = all(bool(jnp.all(x == 0))
                           for x in jax.tree_util.tree_leaves(g_total["answers"]))
        unchanged = all(bool(jnp.array_equal(a, b)) for a, b in zip(
            jax.tree_util.tree_leaves(new_theta["answers"]),
            jax.tree_util.tree_leaves(theta["answers"])))
        if kind == "none":
            assert same and answers_zero and unchanged
        else:
            assert not same and not answers_zero and not unchanged


def test_answers_only_representation_trains_the_torso_by_the_answer_loss_alone():
    cfg = q.Config(**{**TINY, "questions": "hand", "representation": "answers"})
    theta, _, eta, (traj,) = _tiny_setup(cfg, 1)
    g_total, g_ans = jax.jit(lambda p: (
        jax.grad(lambda p: q.agent_loss(p, eta, traj, cfg)[0])(p),
        jax.grad(lambda p: q.answer_loss(p, eta, traj, cfg)[0])(p)))(theta)
    for layer in ("torso1", "torso2"):
        for a, b in zip(jax.tree_util.tree_leaves(g_total[layer]),
                        jax.tree_util.tree_leaves(g_ans[layer])):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    # the heads still learn from the actor-critic loss
    assert float(jnp.abs(g_total["policy"]["w"]).max()) > 0


# ------------------------------------------------------------------------------------ training

def test_same_seed_gives_bit_identical_returns():
    cfg = q.Config(questions="discovered", num_envs=8, unroll=5, hidden=16, num_questions=4,
                   question_hidden=8, learning_rate=0.01, meta_learning_rate=0.01)
    runs = [q.train_jit(jax.random.PRNGKey(s), cfg, 12) for s in (0, 0, 1)]
    a, b, c = runs
    np.testing.assert_array_equal(a.return_sum, b.return_sum)
    np.testing.assert_array_equal(a.episodes, b.episodes)
    assert float(a.eval_return) == float(b.eval_return)
    for x, y in zip(jax.tree_util.tree_leaves((a.theta, a.eta)),
                    jax.tree_util.tree_leaves((b.theta, b.eta))):
        np.testing.assert_array_equal(x, y)
    assert float(a.meta_grad_norm[-1]) > 0  # eta was meta-learned in these steps
    # another seed gives other returns (the comparison above can fail)
    assert not np.array_equal(a.return_sum, c.return_sum)
    assert int(a.episodes.sum()) > 0

"""Discovery of useful questions as auxiliary tasks: an actor-critic agent on ``Catch`` whose shared
torso also learns the answers to GVF questions, the questions meta-learned by gradients through the
agent's update (Veeriah, Hessel, Xu, Lewis, Rajendran, Oh, van Hasselt, Silver & Singh, "Discovery
of Useful Questions as Auxiliary Tasks", NeurIPS 2019, arXiv 1909.04607).

The paper's architecture (its Fig. 1): a main-task-and-answer network with parameters ``theta``
(here an MLP torso on the board, a policy head, a value head and an answer head ``y_theta(o_t)`` in
``R^n``) and a question network with parameters ``eta`` that reads *future* observations and
outputs, for each of ``n`` questions, a cumulant and a discount, which together define ``n`` general
value functions (GVFs, Sutton et al. 2011). The equations, in our notation and numbered (Q1)-(Q4)
by us (the paper uses its own symbols and numbering):

(Q1) Questions, from the next observation (``j = 1`` future observation; ``o_{t+1}`` is the board
     the step produced, the terminal board at an episode's end):
        ``u_t = tanh(f_eta(o_{t+1}))[:n]``,  ``gamma_t = sigmoid(f_eta(o_{t+1}))[n:]``
     (``f_eta`` an MLP; the tanh bound on cumulants is our choice).

(Q2) Answers learn the GVFs by TD over the unroll of length ``T``: the n-step GVF return
        ``Y_t = u_t + gamma_t (1 - d_t) Y_{t+1}``,  ``Y_T = sg(y_theta(o_T))``
     and the answer loss ``L_ans(theta, eta) = 1/2 mean_{t, b, i} (Y_t^i - y_theta(o_t)^i)^2``
     (``d_t``: the episode ended at step t; ``sg``: stop-gradient. ``Y`` depends on ``eta``, not on
     ``theta``: a semi-gradient TD loss for ``theta``).

(Q3) The main task is advantage actor-critic (A2C, Mnih et al. 2016) with n-step returns
        ``G_t = r_t + gamma (1 - d_t) G_{t+1}``, ``G_T = sg(v_theta(o_T))``,
        ``L_RL(theta) = -mean log pi_theta(a_t|o_t) sg(G_t - v_theta(o_t))
                        + c_v 1/2 mean (sg(G_t) - v_theta(o_t))^2 - c_H mean H(pi_theta(.|o_t))``
     and the agent descends ``L(theta, eta) = L_RL(theta) + c_ans L_ans(theta, eta)`` with one optax
     (Adam) update per unroll: ``theta' = theta + U(grad_theta L(theta, eta; tau), s)``, its state
     ``s`` carried across updates. The answer loss reaches the policy only through the shared torso.

(Q4) The meta-gradient (online cross-validation, Xu, van Hasselt & Silver 2018): after ``k``
     agent updates on the unrolls ``tau_0 .. tau_{k-1}``, each collected by the then-current
     parameters, the next unroll ``tau_k`` is collected by ``theta_k`` and
        ``grad_eta = d/d eta  L_RL(theta_k(eta); tau_k)``,
     differentiated through the ``k`` Adam updates (their gradients, second order, and Adam's moment
     updates; the unrolls themselves are data, not differentiated: the actions they hold were
     sampled and are treated as fixed, as the policy-gradient surrogate treats them). ``eta`` takes
     an Adam step on ``grad_eta``; ``tau_k`` then serves as the first unroll of the next block.
     Exactly what is differentiated: the losses' stop-gradient quantities (the bootstraps
     ``sg(v(o_T))``, ``sg(y(o_T))`` and the advantages ``sg(G_t - v(o_t))``) are constants for the
     meta-gradient too, also where they were computed from an earlier ``theta_j(eta)``. So
     ``grad_eta`` is the exact derivative, at ``eta``, of ``L_RL(theta_k(eta); tau_k)`` with every
     such quantity held at its value (the policy-gradient surrogate, whose gradient in ``theta_k``
     is the actor-critic update direction); not the derivative of the surrogate's value, which
     would also move the advantages. tests/test_rl_questions.py checks this against float64
     central differences of that function (``targets_theta`` holds the quantities fixed).
     ``k = 1`` goes through ``maxl_jax.meta.meta_gradient`` (the library's exact unroll; the carried
     Adam state is handed to it as the optimizer's "initial" state), ``k > 1`` through
     ``unrolled_meta_gradient`` here (its generalisation with a fresh unroll per update).

What the paper does: it meta-learns ``eta`` through several successive agent updates, its
"non-myopic" meta-gradient (the abstract's term), motivated by a one-step meta-gradient seeing only
an update's immediate effect (the unroll lengths it used are not restated here: only the paper's
abstract and figure captions were available when this was written). Our default is ``k = 1``
(``Config.meta_steps``), the simplest online form (Xu et al. 2018's one-step cross-validation) and
the one ``maxl_jax.meta.meta_gradient`` computes; ``k > 1`` is implemented, tested against finite
differences, and measured: the reverse-mode meta-gradient through ``k`` updates holds ``k`` unrolls
and ``k`` second-order update graphs (memory and compile time grow with ``k``), and ``eta`` then
moves once per ``k`` agent updates. On Catch with the answers-only torso, ``k = 5`` was both better
and far more reliable than ``k = 1`` (docs/results/rl_questions.md, rl_questions_k5.md), the
direction the paper argues for; the two differ in horizon and also in how often ``eta`` moves, and
we did not separate those.

Agents (``Config.questions``): ``"discovered"`` (eta learned by (Q4)), ``"random"`` (eta fixed at
its random initialisation: the same architecture without meta-learning), ``"hand"`` (hand-designed
questions: one GVF per pixel of the next board, ``u_t^i = o_{t+1}^i``, fixed discount
``hand_discount``; pixel-based cumulants as in the pixel-control tasks of Jaderberg et al. 2017
("UNREAL"), the hand-designed auxiliary task the paper compares with on Atari, here learned as
predictions by TD rather than as control), and ``"none"`` (the answer loss weight is 0: plain A2C).

Representations (``Config.representation``): ``"shared"`` (the default; the paper's Atari setting,
``L_RL`` and ``L_ans`` both train the torso) and ``"answers"`` (the policy and value heads read the
torso through a stop-gradient, so only the answer loss shapes the representation: the paper's
experiments showing that discovered questions alone suffice to build a representation for the main
task). The meta-objective (Q4) is ``L_RL`` without any stop-gradient in both: ``theta_k``'s torso,
moved by the answer loss, is what it judges.

Everything is a pure function of arrays and a static ``Config``; ``train`` is one ``jax.jit`` with
``lax.scan`` over the blocks of updates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from maxl_jax import meta
from maxl_jax.rl import envs

PyTree = Any
QUESTIONS = ("none", "hand", "random", "discovered")
REPRESENTATIONS = ("shared", "answers")


@dataclasses.dataclass(frozen=True)
class Config:
    """A run's settings (hashable: ``train`` takes it as a static argument)."""
    questions: str = "discovered"
    num_envs: int = 32
    unroll: int = 5             # T, steps per unroll (episodes are 9 steps: bootstrapping matters)
    discount: float = 0.99      # the main task's gamma
    hidden: int = 64            # torso width (two ReLU layers)
    num_questions: int = 8      # n for "discovered"/"random" ("hand", "none": one per pixel, 50)
    question_hidden: int = 32   # the question network's hidden width
    answer_weight: float = 1.0  # c_ans ("none" uses 0 whatever this says)
    learning_rate: float = 3e-3
    meta_learning_rate: float = 1e-3
    meta_steps: int = 1         # k, agent updates the meta-gradient differentiates through
    value_weight: float = 0.5   # c_v
    entropy_weight: float = 0.01  # c_H
    hand_discount: float = 0.9
    eps_root: float = 1e-8      # Adam's eps_root: > 0 keeps the meta-gradient finite (meta.unroll)
    representation: str = "shared"  # "shared": L_RL and L_ans both train the torso; "answers":
    #                                 only L_ans does (the paper's "auxiliary tasks alone" setting)

    def __post_init__(self):
        if self.questions not in QUESTIONS:
            raise ValueError(f"questions must be one of {QUESTIONS}, got {self.questions!r}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got "
                             f"{self.representation!r}")
        if self.meta_steps < 1:
            raise ValueError(f"meta_steps must be >= 1, got {self.meta_steps}")

    @property
    def n_questions(self) -> int:
        return envs.OBS_SIZE if self.questions in ("none", "hand") else self.num_questions

    @property
    def effective_answer_weight(self) -> float:
        return 0.0 if self.questions == "none" else self.answer_weight


class Trajectory(NamedTuple):
    """One unroll of ``T`` steps of ``B`` environments (time-major).

    ``obs`` (T, B, 50): o_t the agent acted on; ``actions`` (T, B); ``rewards`` (T, B); ``dones``
    (T, B); ``next_obs`` (T, B, 50): the board each step produced, before any reset (what the
    questions read); ``last_obs`` (B, 50): the observation after the last step (the bootstrap's);
    ``episode_returns`` (T, B): the return of the episode that ended at step t, 0 elsewhere."""
    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    dones: jax.Array
    next_obs: jax.Array
    last_obs: jax.Array
    episode_returns: jax.Array


# ------------------------------------------------------------------------------------ networks

def _dense(key, n_in, n_out, scale=1.0):
    w = jax.random.normal(key, (n_in, n_out)) * (scale / jnp.sqrt(n_in))
    return {"w": w, "b": jnp.zeros((n_out,))}


def _apply_dense(p, x):
    return x @ p["w"] + p["b"]


def init_agent(key: jax.Array, cfg: Config) -> PyTree:
    """theta: torso (two ReLU layers), policy, value and answer heads."""
    k = jax.random.split(key, 5)
    return {"torso1": _dense(k[0], envs.OBS_SIZE, cfg.hidden),
            "torso2": _dense(k[1], cfg.hidden, cfg.hidden),
            "policy": _dense(k[2], cfg.hidden, envs.NUM_ACTIONS, 0.1),
            "value": _dense(k[3], cfg.hidden, 1),
            "answers": _dense(k[4], cfg.hidden, cfg.n_questions)}


def agent_apply(theta: PyTree, obs: jax.Array, detach_main: bool = False):
    """``(policy logits, value, answers)`` for observations of shape ``(..., 50)``.
    ``detach_main``: the policy and value heads see the torso's features through a stop-gradient
    (their losses then train the heads alone)."""
    h = jax.nn.relu(_apply_dense(theta["torso1"], obs))
    h = jax.nn.relu(_apply_dense(theta["torso2"], h))
    h_main = jax.lax.stop_gradient(h) if detach_main else h
    return (_apply_dense(theta["policy"], h_main), _apply_dense(theta["value"], h_main)[..., 0],
            _apply_dense(theta["answers"], h))


def init_questions(key: jax.Array, cfg: Config) -> PyTree:
    """eta: the question network (empty for "none" and "hand", which have no parameters)."""
    if cfg.questions in ("none", "hand"):
        return {}
    k1, k2 = jax.random.split(key)
    return {"q1": _dense(k1, envs.OBS_SIZE, cfg.question_hidden),
            "q2": _dense(k2, cfg.question_hidden, 2 * cfg.num_questions)}


def questions(eta: PyTree, next_obs: jax.Array, cfg: Config):
    """(Q1): ``(cumulants, discounts)``, each ``(..., n)``, from the next observation."""
    if cfg.questions in ("none", "hand"):
        # "none" has answer weight 0; its answer head still gets these (logged, never trained)
        return next_obs, jnp.full(next_obs.shape, cfg.hand_discount, next_obs.dtype)
    out = _apply_dense(eta["q2"], jax.nn.relu(_apply_dense(eta["q1"], next_obs)))
    n = cfg.num_questions
    return jnp.tanh(out[..., :n]), jax.nn.sigmoid(out[..., n:])


# ------------------------------------------------------------------------------------ losses

def discounted_returns(rewards: jax.Array, continuations: jax.Array, bootstrap: jax.Array):
    """``G_t = r_t + c_t G_{t+1}``, ``G_T = bootstrap``, over the leading (time) axis."""
    def body(g, x):
        r, c = x
        g = r + c * g
        return g, g
    _, out = jax.lax.scan(body, bootstrap, (rewards, continuations), reverse=True)
    return out


def _targets_source(theta, targets_theta):
    """The parameters the stop-gradient quantities (bootstraps, advantages) are computed from:
    ``sg(theta)`` by default, or fixed ``targets_theta`` (equal values at ``targets_theta = theta``;
    the finite-difference test holds them fixed to check (Q4) exactly)."""
    return jax.lax.stop_gradient(theta if targets_theta is None else targets_theta)


def actor_critic_loss(theta: PyTree, traj: Trajectory, cfg: Config, detach_main: bool = False,
                      targets_theta: PyTree = None):
    """(Q3) ``L_RL(theta; traj)``: A2C with n-step returns. Returns ``(loss, metrics)``.
    ``detach_main``: its gradient reaches the policy and value heads only (the agent's update under
    ``representation="answers"``; the meta-objective never detaches). ``targets_theta``: see
    ``_targets_source``."""
    logits, v, _ = agent_apply(theta, traj.obs, detach_main)
    src = _targets_source(theta, targets_theta)
    _, v_sg, _ = agent_apply(src, traj.obs)
    _, v_last, _ = agent_apply(src, traj.last_obs)
    cont = cfg.discount * (1.0 - traj.dones.astype(v.dtype))
    g = discounted_returns(traj.rewards.astype(v.dtype), cont, v_last)
    logp_all = jax.nn.log_softmax(logits)
    logp = jnp.take_along_axis(logp_all, traj.actions[..., None], -1)[..., 0]
    pg = -jnp.mean(logp * (g - v_sg))
    value = 0.5 * jnp.mean((g - v) ** 2)
    entropy = jnp.mean(-jnp.sum(jnp.exp(logp_all) * logp_all, -1))
    loss = pg + cfg.value_weight * value - cfg.entropy_weight * entropy
    return loss, {"pg": pg, "value": value, "entropy": entropy}


def answer_loss(theta: PyTree, eta: PyTree, traj: Trajectory, cfg: Config,
                targets_theta: PyTree = None):
    """(Q2) ``L_ans(theta, eta; traj)``: TD on the questions' n-step GVF returns. Returns
    ``(loss, metrics)``."""
    _, _, y = agent_apply(theta, traj.obs)
    _, _, y_last = agent_apply(_targets_source(theta, targets_theta), traj.last_obs)
    cumulants, gammas = questions(eta, traj.next_obs, cfg)
    cont = gammas * (1.0 - traj.dones.astype(y.dtype))[..., None]
    targets = discounted_returns(cumulants, cont, y_last)
    loss = 0.5 * jnp.mean((targets - y) ** 2)
    return loss, {"answer": loss, "cumulant_std": jnp.std(cumulants),
                  "discount_mean": jnp.mean(gammas)}


def agent_loss(theta: PyTree, eta: PyTree, traj: Trajectory, cfg: Config,
               targets_theta: PyTree = None):
    """``L(theta, eta) = L_RL + c_ans L_ans``, what the agent's optimizer descends."""
    rl, rl_m = actor_critic_loss(theta, traj, cfg, cfg.representation == "answers", targets_theta)
    ans, ans_m = answer_loss(theta, eta, traj, cfg, targets_theta)
    return rl + cfg.effective_answer_weight * ans, {**rl_m, **ans_m, "rl": rl}


def agent_optimizer(cfg: Config) -> optax.GradientTransformation:
    return optax.adam(cfg.learning_rate, eps_root=cfg.eps_root)


def agent_update(theta, opt_state, eta, traj, cfg: Config, targets_theta: PyTree = None):
    """One agent update on ``traj``: ``(theta', opt_state', metrics)``, differentiable in
    ``eta``."""
    grads, metrics = jax.grad(agent_loss, has_aux=True)(theta, eta, traj, cfg, targets_theta)
    updates, opt_state = agent_optimizer(cfg).update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, metrics


# ------------------------------------------------------------------------------------ meta-gradient

def _from_state(optimizer: optax.GradientTransformation, state) -> optax.GradientTransformation:
    """``optimizer`` whose ``init`` returns ``state``: hands a carried optax state to
    ``maxl_jax.meta.meta_gradient`` (which starts from ``optimizer.init``)."""
    return optax.GradientTransformation(lambda params: state, optimizer.update)


def unrolled_meta_gradient(theta, opt_state, eta, inner_trajs: Trajectory, outer_traj: Trajectory,
                           cfg: Config):
    """(Q4) through ``k`` updates, one per unroll of ``inner_trajs`` (stacked on a leading ``k``
    axis): ``(L_RL(theta_k; outer_traj), d/d eta of it)``."""
    def objective(e):
        def body(carry, traj):
            p, s = carry
            p, s, _ = agent_update(p, s, e, traj, cfg)
            return (p, s), None
        (theta_k, _), _ = jax.lax.scan(body, (theta, opt_state), inner_trajs)
        return actor_critic_loss(theta_k, outer_traj, cfg)[0]
    return jax.value_and_grad(objective)(eta)


def meta_gradient(theta, opt_state, eta, inner_trajs: Trajectory, outer_traj: Trajectory,
                  cfg: Config):
    """(Q4): ``(outer loss, grad_eta)``. ``k = 1`` (one unroll in ``inner_trajs``) by the library's
    ``maxl_jax.meta.meta_gradient``; ``k > 1`` by ``unrolled_meta_gradient``."""
    k = jax.tree_util.tree_leaves(inner_trajs)[0].shape[0]
    if k > 1:
        return unrolled_meta_gradient(theta, opt_state, eta, inner_trajs, outer_traj, cfg)
    inner = jax.tree_util.tree_map(lambda x: x[0], inner_trajs)
    mg = meta.meta_gradient(lambda p, e: agent_loss(p, e, inner, cfg),
                            lambda p, e: actor_critic_loss(p, outer_traj, cfg),
                            theta, eta, _from_state(agent_optimizer(cfg), opt_state), steps=1)
    return mg.outer_loss, mg.grad_hyper


# ------------------------------------------------------------------------------------ acting

def rollout(theta, env_state, obs, key, cfg: Config):
    """``T`` steps of the batch with actions sampled from ``pi_theta``:
    ``(env_state, obs, Trajectory)``. Returns are tracked in ``env_state[1]``."""
    env, ep_return = env_state

    def body(carry, k):
        env, obs, ep_return = carry
        logits, _, _ = agent_apply(theta, obs)
        action = jax.random.categorical(k, logits).astype(jnp.int32)
        env, ts = jax.vmap(envs.step_autoreset)(env, action)
        ep_return = ep_return + ts.reward
        finished = jnp.where(ts.done, ep_return, 0.0)
        ep_return = jnp.where(ts.done, 0.0, ep_return)
        out = (obs, action, ts.reward, ts.done, ts.next_obs, finished)
        return (env, ts.obs, ep_return), out

    keys = jax.random.split(key, cfg.unroll)
    (env, obs, ep_return), (o, a, r, d, no, fin) = jax.lax.scan(body, (env, obs, ep_return), keys)
    return (env, ep_return), obs, Trajectory(o, a, r, d, no, obs, fin)


def init_envs(key: jax.Array, num_envs: int):
    """``num_envs`` Catch environments, desynchronised: each has taken a uniform 0..8 steps with
    random actions, so episodes do not all end on the same step. ``((envs, returns), obs)``."""
    k_reset, k_offset, k_act = jax.random.split(key, 3)
    env, obs = jax.vmap(envs.reset)(jax.random.split(k_reset, num_envs))
    offsets = jax.random.randint(k_offset, (num_envs,), 0, envs.EPISODE_LENGTH)

    def body(i, carry):
        env, obs = carry
        a = jax.random.randint(jax.random.fold_in(k_act, i), (num_envs,), 0, envs.NUM_ACTIONS)
        new, ts = jax.vmap(envs.step_autoreset)(env, a)
        move = i < offsets
        env = jax.tree_util.tree_map(
            lambda x, y: jnp.where(move.reshape(move.shape + (1,) * (x.ndim - 1)), x, y), new, env)
        return env, jnp.where(move[:, None], ts.obs, obs)

    env, obs = jax.lax.fori_loop(0, envs.EPISODE_LENGTH - 1, body, (env, obs))
    return (env, jnp.zeros((num_envs,))), obs


def evaluate(theta, key, cfg: Config, episodes: int = 1000, greedy: bool = False):
    """Mean return of ``episodes`` fresh episodes under ``pi_theta`` (sampled, or its argmax)."""
    k_reset, k_act = jax.random.split(key)
    env, obs = jax.vmap(envs.reset)(jax.random.split(k_reset, episodes))

    def body(carry, k):
        env, obs, total = carry
        logits, _, _ = agent_apply(theta, obs)
        a = (jnp.argmax(logits, -1) if greedy else jax.random.categorical(k, logits))
        env, ts = jax.vmap(envs.step)(env, a.astype(jnp.int32))
        return (env, ts.obs, total + ts.reward), None

    (_, _, total), _ = jax.lax.scan(body, (env, obs, jnp.zeros((episodes,))),
                                    jax.random.split(k_act, envs.EPISODE_LENGTH))
    return jnp.mean(total)


# ------------------------------------------------------------------------------------ training

class TrainResult(NamedTuple):
    """Per agent update (``iterations`` rows): ``return_sum``/``episodes``: the summed returns and
    the number of episodes that ended in the unroll after it; the losses and the questions'
    statistics of the update; ``meta_grad_norm`` (per update, the block's value; 0 without meta).
    ``eval_return``/``eval_greedy``: the final policy on 1000 fresh episodes. ``theta``, ``eta``:
    the final parameters."""
    return_sum: jax.Array
    episodes: jax.Array
    metrics: dict
    meta_grad_norm: jax.Array
    eval_return: jax.Array
    eval_greedy: jax.Array
    theta: PyTree
    eta: PyTree


def train(key: jax.Array, cfg: Config, iterations: int) -> TrainResult:
    """``iterations`` agent updates (``iterations / k`` meta-updates for "discovered"). Pure; jit it
    with ``cfg`` and ``iterations`` static (``train_jit``)."""
    k = cfg.meta_steps
    if iterations % k:
        raise ValueError(f"iterations ({iterations}) must be a multiple of meta_steps ({k})")
    k_theta, k_eta, k_env, k_run, k_eval = jax.random.split(key, 5)
    theta = init_agent(k_theta, cfg)
    eta = init_questions(k_eta, cfg)
    opt_state = agent_optimizer(cfg).init(theta)
    meta_opt = optax.adam(cfg.meta_learning_rate)
    meta_state = meta_opt.init(eta)
    env_state, obs = init_envs(k_env, cfg.num_envs)
    k_first, k_run = jax.random.split(k_run)
    env_state, obs, traj = rollout(theta, env_state, obs, k_first, cfg)
    learn_eta = cfg.questions == "discovered"

    def inner(carry, key):
        theta, opt_state, eta, env_state, obs, traj = carry
        theta_new, opt_state_new, metrics = agent_update(theta, opt_state, eta, traj, cfg)
        env_state, obs, traj_new = rollout(theta_new, env_state, obs, key, cfg)
        out = (traj, jnp.sum(traj_new.episode_returns), jnp.sum(traj_new.dones), metrics)
        return (theta_new, opt_state_new, eta, env_state, obs, traj_new), out

    def block(carry, key):
        theta, opt_state, eta, meta_state, env_state, obs, traj = carry
        (theta_k, opt_state_k, _, env_state, obs, traj_k), (trajs, rsum, neps, metrics) = \
            jax.lax.scan(inner, (theta, opt_state, eta, env_state, obs, traj),
                         jax.random.split(key, k))
        if learn_eta:
            _, g = meta_gradient(theta, opt_state, eta, trajs, traj_k, cfg)
            updates, meta_state = meta_opt.update(g, meta_state, eta)
            eta = optax.apply_updates(eta, updates)
            gnorm = optax.tree.norm(g)
        else:
            gnorm = jnp.zeros(())
        out = (rsum, neps, metrics, jnp.full((k,), gnorm))
        return (theta_k, opt_state_k, eta, meta_state, env_state, obs, traj_k), out

    carry = (theta, opt_state, eta, meta_state, env_state, obs, traj)
    carry, (rsum, neps, metrics, gnorm) = jax.lax.scan(
        block, carry, jax.random.split(k_run, iterations // k))
    theta, eta = carry[0], carry[2]
    flat = lambda x: x.reshape((iterations,) + x.shape[2:])  # noqa: E731
    k1, k2 = jax.random.split(k_eval)
    return TrainResult(flat(rsum), flat(neps), jax.tree_util.tree_map(flat, metrics), flat(gnorm),
                       evaluate(theta, k1, cfg), evaluate(theta, k2, cfg, greedy=True),
                       theta, eta)


train_jit = jax.jit(train, static_argnums=(1, 2))

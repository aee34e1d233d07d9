"""Catch, the bsuite environment (Osband et al., "Behaviour Suite for Reinforcement Learning",
ICLR 2020; ``bsuite/environments/catch.py``), written as pure JAX functions.

A ``ROWS x COLUMNS = 10 x 5`` board. ``reset`` drops a ball in row 0 at a uniformly random column
and puts the paddle in the bottom row at the middle column (``COLUMNS // 2``). Each ``step`` first
moves the paddle by ``action - 1`` (actions 0/1/2 = left/stay/right, clipped at the walls), then the
ball falls one row. When the ball reaches the bottom row (after ``ROWS - 1 = 9`` steps) the episode
ends with reward ``+1`` if the paddle is under the ball and ``-1`` otherwise; every other reward is
0. The observation is the board as floats: 1 at the ball and at the paddle, 0 elsewhere.

Every function is pure and works on one environment; ``jax.vmap`` runs a batch. ``step`` does not
reset; ``step_autoreset`` does, with the key carried in the state, and also returns the observation
before the reset (the terminal board), which the GVF questions of ``maxl_jax.rl.questions`` read.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ROWS = 10
COLUMNS = 5
NUM_ACTIONS = 3
EPISODE_LENGTH = ROWS - 1
OBS_SIZE = ROWS * COLUMNS


class CatchState(NamedTuple):
    """One environment: the ball's column and row, the paddle's column, the step within the episode
    and the key the next reset draws from."""
    ball_x: jax.Array
    ball_y: jax.Array
    paddle_x: jax.Array
    t: jax.Array
    key: jax.Array


class TimeStep(NamedTuple):
    """``obs``: the observation the agent acts on next (after a reset when ``done`` under
    ``step_autoreset``); ``next_obs``: the observation the step produced, before any reset;
    ``reward``; ``done``: the step ended the episode."""
    obs: jax.Array
    next_obs: jax.Array
    reward: jax.Array
    done: jax.Array


def observe(state: CatchState) -> jax.Array:
    """The board, flattened to ``(ROWS * COLUMNS,)`` in the default float dtype."""
    board = jnp.zeros((ROWS, COLUMNS))
    board = board.at[state.ball_y, state.ball_x].set(1.0)
    board = board.at[ROWS - 1, state.paddle_x].set(1.0)
    return board.reshape(-1)


def reset(key: jax.Array) -> tuple[CatchState, jax.Array]:
    """A new episode: ``(state, observation)``."""
    key, sub = jax.random.split(key)
    ball_x = jax.random.randint(sub, (), 0, COLUMNS)
    zero = jnp.zeros((), jnp.int32)
    state = CatchState(ball_x.astype(jnp.int32), zero, jnp.full((), COLUMNS // 2, jnp.int32),
                       zero, key)
    return state, observe(state)


def step(state: CatchState, action: jax.Array) -> tuple[CatchState, TimeStep]:
    """One step, no reset: paddle moves by ``action - 1``, the ball falls one row; reward only on
    the step that brings the ball to the bottom row."""
    paddle_x = jnp.clip(state.paddle_x + action.astype(jnp.int32) - 1, 0, COLUMNS - 1)
    ball_y = state.ball_y + 1
    done = ball_y == ROWS - 1
    caught = paddle_x == state.ball_x
    reward = jnp.where(done, jnp.where(caught, 1.0, -1.0), 0.0)
    new = CatchState(state.ball_x, ball_y, paddle_x, state.t + 1, state.key)
    obs = observe(new)
    return new, TimeStep(obs, obs, reward, done)


def step_autoreset(state: CatchState, action: jax.Array) -> tuple[CatchState, TimeStep]:
    """``step``, then a reset (from ``state.key``) where the episode ended: ``obs`` is the new
    episode's first observation there, ``next_obs`` the terminal board."""
    new, ts = step(state, action)
    fresh, fresh_obs = reset(state.key)
    chosen = jax.tree_util.tree_map(lambda a, b: jnp.where(ts.done, a, b), fresh, new)
    obs = jnp.where(ts.done, fresh_obs, ts.obs)
    return chosen, TimeStep(obs, ts.next_obs, ts.reward, ts.done)

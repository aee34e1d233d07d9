"""Reinforcement learning with auxiliary tasks: ``envs`` (Catch in pure JAX) and ``questions``
(discovery of useful questions as auxiliary tasks, Veeriah et al., NeurIPS 2019)."""

from maxl_jax.rl import envs, questions

__all__ = ["envs", "questions"]

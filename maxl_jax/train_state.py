"""The immutable train state: one pytree holding everything a MAXL run needs to continue."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Both networks, their BatchNorm statistics, both optimizer states, the step counters and the key.

    Attributes:
      step: int32 scalar, theta1 (multi-task) updates taken so far.
      meta_step: int32 scalar, theta2 (label-generator) updates taken so far.
      multitask_params / multitask_batch_stats / multitask_opt_state: f(theta1).
      generator_params / generator_batch_stats / generator_opt_state: g(theta2); empty dicts for the
        methods that have no generator (single, human, random).
      rng: uint32[2] PRNG key of the run; per-step keys are ``fold_in(rng, step)``.
    """

    step: jax.Array
    meta_step: jax.Array
    multitask_params: PyTree
    multitask_batch_stats: PyTree
    multitask_opt_state: PyTree
    generator_params: PyTree
    generator_batch_stats: PyTree
    generator_opt_state: PyTree
    rng: jax.Array

    @property
    def multitask_variables(self) -> dict:
        return {"params": self.multitask_params, "batch_stats": self.multitask_batch_stats}

    @property
    def generator_variables(self) -> dict:
        return {"params": self.generator_params, "batch_stats": self.generator_batch_stats}

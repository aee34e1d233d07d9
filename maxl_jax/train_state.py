"""The immutable train state: one pytree holding everything a run needs to continue, for any method."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """The multi-task network, the method's own learned state, the counters, the key and the loop's sums.

    Attributes:
      step: int32 scalar, updates of the multi-task network (theta1) so far.
      meta_step: int32 scalar, meta updates of the method's learned state so far (0 for methods
        without a meta step).
      multitask_params / multitask_batch_stats / multitask_opt_state: f(theta1).
      method_state: what the method learns besides theta1, a dict whose layout the method defines
        (MAXL: the label generator's ``params``, ``batch_stats`` and ``opt_state``; OL-AUX: its task
        weights and gradient-product sums; ``{}`` for single-task, human and random).
      rng: uint32[2] PRNG key of the run; per-step keys are ``fold_in(rng, counter)``.
      sums: the training loop's running sums of the current epoch's metrics (``{}`` outside the
        loop), so an epoch resumed from a checkpoint reports what an uninterrupted one reports.
    """

    step: jax.Array
    meta_step: jax.Array
    multitask_params: PyTree
    multitask_batch_stats: PyTree
    multitask_opt_state: PyTree
    method_state: PyTree
    rng: jax.Array
    sums: PyTree = flax.struct.field(default_factory=dict)

    @property
    def multitask_variables(self) -> dict:
        return {"params": self.multitask_params, "batch_stats": self.multitask_batch_stats}

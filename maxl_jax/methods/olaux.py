"""OL-AUX: online learning of auxiliary task weights (Lin, Baweja, Kantor & Held, "Adaptive
Auxiliary Task Weighting for Reinforcement Learning", NeurIPS 2019).

The training loss is ``L_pri + sum_k w_k L_aux_k``. The weights follow the gradient of the primary
loss after the next updates: to first order in the step size ``alpha``,
``d/dw_k L_pri(theta - alpha (g_0 + sum_j w_j g_j)) = -alpha <g_0, g_k>`` (``g_0 = grad L_pri``,
``g_k = grad L_aux_k``), so every ``every`` (N) training steps

    w_k <- max(0, w_k + beta * alpha * mean_{last N steps} <g_0, g_k>)

with the products over the shared parameters (the backbone: the heads' products are zero, each head
serving one side) and ``alpha`` the multi-task network's current learning rate. Each step takes one
reverse pass per task; the products accumulate in the method's state, so the weight update needs no
extra data and no meta step.

Defaults (the paper leaves them to the environment; these are ours, written here): ``N = 5``,
``beta = 1``, initial weights ``aux_weight`` (1). The auxiliary labels come with the data
(``--config.aux_tasks``, like ``equal``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from maxl_jax import losses, steps, validation
from maxl_jax.methods import base
from maxl_jax.methods import register
from maxl_jax.methods.equal import default_tasks


@register
class OlAux(base.Method):
    """Auxiliary weights moved online by the alignment of auxiliary and primary gradients.

    Attributes:
      initial_weights: ``(T,)`` starting weights.
      every: N, training steps between weight updates.
      beta: the weights' step size (multiplied by the current learning rate ``lr(step)``).
      lr: the multi-task network's learning-rate schedule, a function of its step count.
    """

    name = "olaux"
    config_fields = ("aux_tasks", "psi", "aux_per_class", "aux_weight")
    train_checked = base.Method.train_checked + ("auxiliary_loss",)
    report = ()

    initial_weights: tuple[float, ...] = ()
    every: int = 5
    beta: float = 1.0
    lr: Callable[[Any], Any] = lambda count: 0.01

    def __post_init__(self):
        super().__post_init__()
        if not self.aux_tasks or len(self.initial_weights) != len(self.aux_tasks):
            raise ValueError(f"olaux needs one initial weight per auxiliary task (at least one "
                             f"task); got {len(self.initial_weights)} for {len(self.aux_tasks)}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"olaux.every must be an integer >= 1, got {self.every!r}")

    @classmethod
    def defaults(cls) -> dict:
        return {"every": 5, "beta": 1.0}

    @classmethod
    def check_fields(cls, fields) -> None:
        validation.check_range("every", fields.every, "int", 1, prefix="olaux.")
        validation.check_range("beta", fields.beta, "float", 0.0, prefix="olaux.")

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        tasks = base.label_tasks(config, setup, default_tasks(setup))
        multitask, _ = base.networks(config, setup, sum(sum(t.psi) for t in tasks))
        return cls(multitask=multitask, multitask_optimizer=base.multitask_optimizer(config, setup),
                   aux_tasks=tasks, gamma=config.gamma,
                   initial_weights=(float(config.aux_weight),) * len(tasks),
                   every=int(config.olaux.every), beta=float(config.olaux.beta),
                   lr=steps.step_lr_schedule(config.lr, setup.steps_per_epoch, config.decay_every))

    def init_method_state(self, rng, dummy_images):
        t = len(self.aux_tasks)
        return {"weights": jnp.asarray(self.initial_weights, jnp.float32),
                "dot_sum": jnp.zeros((t,), jnp.float32)}

    def train_step(self, state, batch, axis_name=None):
        values, grads, stats, logits = self.task_gradients(
            state.multitask_params, state.multitask_batch_stats, batch, axis_name)
        weights = state.method_state["weights"]
        both = jnp.concatenate([jnp.ones((1,), weights.dtype), weights])
        grad = base.combine_task_gradients(grads, both, both)
        products = base.shared_dots(grads)[0, 1:]
        dot_sum = state.method_state["dot_sum"] + products
        # After every N-th step: w <- max(0, w + beta * alpha * mean of the N products).
        due = (state.step + 1) % self.every == 0
        moved = jnp.maximum(weights + self.beta * self.lr(state.step) * dot_sum / self.every, 0.0)
        method_state = {"weights": jnp.where(due, moved, weights),
                        "dot_sum": jnp.where(due, jnp.zeros_like(dot_sum), dot_sum)}
        new_state, norms = self.update_multitask(state, grad, stats, method_state=method_state)
        return new_state, {
            "loss": values[0] + jnp.sum(weights * values[1:]), "primary_loss": values[0],
            "auxiliary_loss": jnp.mean(values[1:]), "task_losses": values[1:],
            "task_weights": weights, "gradient_products": products,
            "accuracy": losses.accuracy(logits, batch["primary"], axis_name, batch.get("mask")), **norms}

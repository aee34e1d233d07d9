"""GCS: gradient cosine similarity (Du, Czarnecki, Jayakumar, Farajtabar, Pascanu &
Lakshminarayanan, "Adapting Auxiliary Losses Using Gradient Similarity", arXiv 1812.02224, 2018).

An auxiliary loss helps the shared parameters only while its gradient points the primary task's way.
With ``g_0 = grad L_pri`` and ``g_k = grad L_aux_k`` over the shared parameters (the backbone),
``cos_k = <g_0, g_k> / (|g_0| |g_k|)`` and the shared parameters' update direction is

    unweighted (default):  g_0 + sum_k [cos_k > 0] * w_k g_k        (Algorithm 1 of the paper)
    weighted:              g_0 + sum_k max(0, cos_k) * w_k g_k      (its weighted variant)

while each head keeps its own task's gradient (the primary head ``g_0``, the auxiliary head
``sum_k w_k g_k``). ``w_k = aux_weight`` (1). The unweighted variant is the one every
re-implementation uses (AuxiLearn's ``experiments/weight_methods.py: GradCosine`` among them). The
auxiliary labels come with the data (``--config.aux_tasks``, like ``equal``). Each step takes one
reverse pass per task; there is no meta step.

What it gates is logged: each training step's ``kept`` (per auxiliary task, 1 when its gradient
passed, or the weight ``max(0, cos)`` when ``weighted``) and ``cosine``; the epoch record in
``metrics.jsonl`` holds their epoch means (``train.kept``: the fraction of steps whose auxiliary
gradient passed, per task; ``train.cosine``: the mean cosine per task), and the console's epoch line
shows both. A run whose ``kept`` stays at 0 is single-task training with an extra head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxl_jax import losses
from maxl_jax.methods import base
from maxl_jax.methods import register
from maxl_jax.methods.equal import default_tasks


@register
class Gcs(base.Method):
    """Auxiliary gradients added to the shared parameters' update only when aligned with the
    primary gradient.

    Attributes:
      weights: ``(T,)`` fixed weight of each auxiliary task.
      weighted: scale each kept gradient by its cosine (``max(0, cos)``) instead of 0/1.
    """

    name = "gcs"
    config_fields = ("aux_tasks", "psi", "aux_per_class", "aux_weight")
    train_checked = base.Method.train_checked + ("auxiliary_loss",)
    train_report = (("kept", "aux gradients passed"), ("cosine", "cosine"))

    weights: tuple[float, ...] = ()
    weighted: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not self.aux_tasks or len(self.weights) != len(self.aux_tasks):
            raise ValueError(f"gcs needs one weight per auxiliary task (at least one task); got "
                             f"{len(self.weights)} weights for {len(self.aux_tasks)} tasks")

    @classmethod
    def defaults(cls) -> dict:
        return {"weighted": False}

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        tasks = base.label_tasks(config, setup, default_tasks(setup))
        multitask, _ = base.networks(config, setup, sum(sum(t.psi) for t in tasks))
        return cls(multitask=multitask, multitask_optimizer=base.multitask_optimizer(config, setup),
                   aux_tasks=tasks, gamma=config.gamma,
                   weights=(float(config.aux_weight),) * len(tasks),
                   weighted=bool(config.gcs.weighted))

    def train_step(self, state, batch, axis_name=None):
        values, grads, stats, logits = self.task_gradients(
            state.multitask_params, state.multitask_batch_stats, batch, axis_name)
        weights = jnp.asarray(self.weights, values.dtype)
        grad, cosine, gate = gated_gradient(grads, weights, self.weighted)
        new_state, update_norms = self.update_multitask(state, grad, stats)
        return new_state, {
            "loss": values[0] + jnp.sum(weights * values[1:]), "primary_loss": values[0],
            "auxiliary_loss": jnp.mean(values[1:]), "task_losses": values[1:],
            "cosine": cosine, "kept": gate,
            "accuracy": losses.accuracy(logits, batch["primary"], axis_name, batch.get("mask")), **update_norms}


def gated_gradient(grads, weights: jax.Array, weighted: bool = False):
    """GCS's update direction from the task gradients ``grads`` (leading axis ``1 + T``: the
    primary, then each auxiliary task; the multi-task network's tree with a ``backbone``).

    Returns ``(direction, cosine (T,), gate (T,))``: on the backbone ``g_0 + sum_k gate_k w_k g_k``
    with ``gate_k = [cos_k > 0]`` (or ``max(0, cos_k)`` when ``weighted``), on the heads
    ``g_0 + sum_k w_k g_k``.
    """
    dots = base.shared_dots(grads)
    norms = jnp.sqrt(jnp.diag(dots))
    cosine = dots[0, 1:] / jnp.maximum(norms[0] * norms[1:], 1e-30)
    gate = jnp.maximum(cosine, 0.0) if weighted else (cosine > 0).astype(cosine.dtype)
    one = jnp.ones((1,), weights.dtype)
    direction = base.combine_task_gradients(grads, jnp.concatenate([one, gate * weights]),
                                            jnp.concatenate([one, weights]))
    return direction, cosine, gate

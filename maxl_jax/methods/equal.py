"""Auxiliary tasks with fixed weights: ``equal``, and the reference's ``human`` and ``random`` controls.

``L = L_pri + sum_t w_t L_aux_t`` with every loss the focal loss (gamma 2) and ``w_t = aux_weight``
(1 by default: the "Equal" baseline of the auxiliary-learning literature, all losses weight 1). The
auxiliary labels come with the data (``--config.aux_tasks``, comma-separated):

* ``human``: the data set's fine labels (CIFAR-100's 100 classes under the 20 superclasses;
  Fashion-MNIST's 10 under its 5 groups), the reference's ``model_vgg_human.py``;
* ``random``: for each training example, a class drawn once (seeded) inside its primary class's
  block of ``psi`` (the RL-AUX authors' "random auxiliary labels" control).

Several tasks share the auxiliary head (their logits concatenated, a softmax over each task's slice).
Registered as ``equal`` (tasks from ``--config.aux_tasks``; default ``human`` where the data set has
fine labels, else ``random``), ``human`` (the human task alone) and ``random`` (the random task alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxl_jax import losses
from maxl_jax.methods import base
from maxl_jax.methods import register


def default_tasks(setup: base.Setup) -> tuple[str, ...]:
    """``human`` where the data set has fine labels, else ``random``."""
    return ("human",) if setup.psi_human is not None else ("random",)


@register
class Equal(base.Method):
    """Primary plus data-supplied auxiliary tasks, each auxiliary loss with a fixed weight.

    Attributes:
      weights: ``(T,)`` weight of each auxiliary task's loss.
    """

    name = "equal"
    config_fields = ("aux_tasks", "psi", "aux_per_class", "aux_weight")
    train_checked = base.Method.train_checked + ("auxiliary_loss",)

    weights: tuple[float, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if not self.aux_tasks:
            raise ValueError(f"method {self.name!r} needs at least one auxiliary task")
        if len(self.weights) != len(self.aux_tasks):
            raise ValueError(f"{len(self.weights)} weights for {len(self.aux_tasks)} auxiliary tasks")

    @classmethod
    def tasks_from_config(cls, config, setup):
        return base.label_tasks(config, setup, default_tasks(setup))

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        tasks = cls.tasks_from_config(config, setup)
        multitask, _ = base.networks(config, setup, sum(sum(t.psi) for t in tasks))
        return cls(multitask=multitask, multitask_optimizer=base.multitask_optimizer(config, setup),
                   aux_tasks=tasks, gamma=config.gamma,
                   weights=(float(config.aux_weight),) * len(tasks))

    def train_step(self, state, batch, axis_name=None):
        targets = self.data_targets(batch)
        weights = jnp.asarray(self.weights, jnp.float32)
        mask = batch.get("mask")

        def loss_fn(params):
            logits, aux_logits, stats = self.forward(params, state.multitask_batch_stats,
                                                     batch["image"], axis_name, mask)
            primary = losses.batch_mean(self.primary_losses(logits, batch["primary"]), axis_name,
                                        mask)
            task = losses.batch_mean(losses.task_focal_losses(aux_logits, targets, self.aux_sizes,
                                                              self.gamma), axis_name, mask)
            return primary + jnp.sum(weights * task), (stats, logits, primary, task)

        (loss, (stats, logits, primary, task)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.multitask_params)
        new_state, norms = self.update_multitask(state, grads, stats)
        return new_state, {"loss": loss, "primary_loss": primary,
                           "auxiliary_loss": jnp.mean(task), "task_losses": task,
                           "accuracy": losses.accuracy(logits, batch["primary"], axis_name,
                                                       batch.get("mask")), **norms}


@register
class Human(Equal):
    """The reference's human auxiliary task: the data set's fine labels, weight ``aux_weight``."""

    name = "human"
    config_fields = ("aux_weight",)

    @classmethod
    def tasks_from_config(cls, config, setup):
        if setup.psi_human is None:
            raise ValueError(
                f"method 'human' needs a data set with fine labels (cifar100, fashion_mnist_coarse); "
                f"{setup.dataset!r} has none")
        return (base.AuxTask("human", tuple(setup.psi_human)),)


@register
class Random(Equal):
    """Fixed random auxiliary labels inside each example's block of ``psi``, weight ``aux_weight``."""

    name = "random"
    config_fields = ("psi", "aux_per_class", "aux_weight")

    @classmethod
    def tasks_from_config(cls, config, setup):
        return (base.AuxTask("random", base.psi_of(config, setup)),)

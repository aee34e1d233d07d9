"""Single-task learning: the primary loss alone (the reference's ``model_vgg_single.py``).

``L = L_pri``, the focal loss (gamma 2) of the primary head; theta1 by the reference's SGD. The
multi-task network keeps its auxiliary head (``sum(psi)`` outputs, never trained), so every method
trains the same architecture. The control every auxiliary-learning result must be shown against.
"""

from __future__ import annotations

import jax

from maxl_jax import losses
from maxl_jax.methods import base
from maxl_jax.methods import register


@register
class Single(base.Method):
    """Primary task only. No meta step, no learned state besides theta1."""

    name = "single"
    config_fields = ("psi", "aux_per_class")

    @classmethod
    def from_config(cls, config, setup: base.Setup) -> "Single":
        multitask, _ = base.networks(config, setup, sum(base.psi_of(config, setup)))
        return cls(multitask=multitask, multitask_optimizer=base.multitask_optimizer(config, setup),
                   gamma=config.gamma)

    def train_step(self, state, batch, axis_name=None):
        mask = batch.get("mask")

        def loss_fn(params):
            logits, _, stats = self.forward(params, state.multitask_batch_stats, batch["image"],
                                            axis_name, mask)
            primary = losses.batch_mean(self.primary_losses(logits, batch["primary"]), axis_name,
                                        mask)
            return primary, (stats, logits)

        (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.multitask_params)
        new_state, norms = self.update_multitask(state, grads, stats)
        return new_state, {"loss": loss, "primary_loss": loss,
                           "accuracy": losses.accuracy(logits, batch["primary"], axis_name, mask),
                           **norms}

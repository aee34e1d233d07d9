"""MAXL: Meta AuXiliary Learning (Liu, Davison & Johns, "Self-Supervised Generalisation with Meta
Auxiliary Learning", NeurIPS 2019), as the authors' reference code (``lorenmt/maxl``) runs it.

A label generator g(theta2) turns each image and its primary label into a soft auxiliary label
``s = mask_softmax(g(x), y)`` over the primary class's block of ``psi`` (eq. 1 and the mask of
section 3.2). The multi-task network trains on ``L_pri + aux_weight * L_aux(s)`` (eq. 2, focal loss,
gamma 2). The generator's meta step (eq. 3-4): ``theta1+ = theta1 - alpha grad L_train(theta1, s)``,
then ``d/d theta2 [L_pri(theta1+) + entropy_weight * H(s)]``, differentiated exactly through the
update (second order). Two first-order forms: ``meta_form="finite_difference"`` is the reference's
finite-difference estimate inside our meta step (entropy term kept, our alpha schedule, f's
BatchNorm statistics updated once), and ``meta_form="reference_first_order"`` is
``model_vgg_maxl_firstorder.py`` exactly: alpha is theta1's learning rate (``--config.lr`` on
theta1's schedule, halved from epoch 50, where the exact step's alpha is halved from 49:
``--config.inner_lr`` is not read), the entropy term never reaches the generator (the reference
overwrites the generator's gradient with the difference), and the two perturbed forwards update f's
and g's BatchNorm running statistics, three updates per meta step
(``maxl.reference_first_order_meta_gradient``).

The reference's defaults: theta1 SGD 0.01; theta2 SGD 1e-3 with weight decay 5e-4; alpha 0.01;
entropy weight 0.2; ``psi = [5] * 20`` on CIFAR-100's 20 superclasses; both learning rates halved
from epochs 50, 100, 150 and alpha from epochs 49, 99, 149. Its epoch is two passes: one theta1
step per training batch, then one theta2 step per batch of a fresh shuffle of the same training set.
The pure functions are in ``maxl_jax.maxl``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from maxl_jax import hierarchy, losses, maxl, models, steps, validation
from maxl_jax.meta import FORMS
from maxl_jax.methods import base
from maxl_jax.methods import register

#: MAXL's meta-gradient forms: the estimators of ``maxl_jax.meta`` and the reference's own
#: first-order step.
MAXL_FORMS = FORMS + ("reference_first_order",)


@register
class Maxl(base.Method):
    """MAXL: a label generator meta-trained through one differentiated update of theta1.

    Attributes:
      generator: the label generator g(theta2) (``models.LabelGenerator``, ``sum(psi)`` outputs).
      psi: the hierarchy of the generated labels.
      generator_optimizer: optax transformation for theta2.
      inner_lr: schedule of the inner step size alpha, a function of ``meta_step``.
      inner_optimizer: ``lr -> GradientTransformation`` used for theta1+ (default plain SGD).
      inner_steps, entropy_weight, aux_weight: as in ``maxl.generator_meta_gradient``.
      meta_form: ``"reverse"``, ``"forward_over_reverse"`` (exact) or ``"finite_difference"``.
    """

    name = "maxl"
    config_fields = ("psi", "aux_per_class", "generator_lr", "weight_decay", "inner_lr",
                     "inner_steps", "entropy_weight", "aux_weight", "meta_form")
    train_checked = base.Method.train_checked + ("auxiliary_loss",)
    meta_checked = base.Method.meta_checked + ("primary_after", "entropy_term")
    report = (("primary_before", "primary at theta1"), ("primary_after", "primary at theta1+"),
              ("label_entropy", "label entropy (nats)"))

    generator: models.LabelGenerator
    psi: Sequence[int]
    generator_optimizer: optax.GradientTransformation
    inner_lr: Callable[[jax.Array], Any] = lambda count: 0.01
    inner_optimizer: Callable[[Any], optax.GradientTransformation] = optax.sgd
    inner_steps: int = 1
    entropy_weight: float = 0.2
    aux_weight: float = 1.0
    meta_form: str = "reverse"
    meta_forms = MAXL_FORMS
    schedule: base.MetaSchedule = base.MetaSchedule(per_epoch_pass=True, sources=("train",))

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "psi", hierarchy.validate_psi(self.psi, self.num_primary))
        if self.multitask.num_auxiliary != sum(self.psi):
            raise ValueError(
                f"the auxiliary head has {self.multitask.num_auxiliary} classes but sum(psi) = "
                f"{sum(self.psi)}: build the networks with num_auxiliary=sum(psi)")
        if self.generator.num_auxiliary != sum(self.psi):
            raise ValueError(f"the label generator has {self.generator.num_auxiliary} outputs but "
                             f"sum(psi) = {sum(self.psi)}")
        if self.meta_form not in MAXL_FORMS:
            raise ValueError(f"unknown meta_form {self.meta_form!r}; choose one of {MAXL_FORMS}")

    @classmethod
    def validate_config(cls, config) -> None:
        if config.get("meta_form") not in cls.meta_forms:
            raise validation.ConfigError(f"--config.meta_form={config.get('meta_form')!r} is not "
                                         f"one of {cls.meta_forms} for --method={cls.name}")
        super().validate_config(config)

    @classmethod
    def mode_of(cls, config) -> dict[str, str]:
        form = str(config.get("meta_form"))
        return {**super().mode_of(config),
                "meta_form": {"reverse": "reverse (exact second order, the paper)",
                              "forward_over_reverse": "forward_over_reverse (exact second order)",
                              "finite_difference": "finite_difference (the reference's "
                                                   "first-order estimate, our meta step)",
                              "reference_first_order": "reference_first_order (the reference's "
                                                       "first-order step exactly)"}.get(form, form)}

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        return cls(**cls.fields_from_config(config, setup))

    @classmethod
    def fields_from_config(cls, config, setup: base.Setup, weight_head: bool = False) -> dict:
        """The constructor's fields from the shared config (``weight_head``: WAMAL's generator)."""
        psi = base.psi_of(config, setup)
        multitask, generator = base.networks(config, setup, sum(psi),
                                             generator_weight_head=weight_head)
        f_opt, g_opt, inner_lr = steps.reference_optimizers(
            setup.steps_per_epoch, config.lr, config.generator_lr, config.weight_decay,
            config.decay_every, config.inner_lr)
        if config.meta_form == "reference_first_order":  # alpha = theta1's rate, as the reference
            inner_lr = steps.step_lr_schedule(config.lr, setup.steps_per_epoch, config.decay_every)
        return dict(multitask=multitask, multitask_optimizer=f_opt, generator=generator, psi=psi,
                    generator_optimizer=g_opt, inner_lr=inner_lr, inner_steps=config.inner_steps,
                    entropy_weight=config.entropy_weight, aux_weight=config.aux_weight,
                    gamma=config.gamma, meta_form=config.meta_form)

    # -------------------------------------------------------------------------------- state
    def init_method_state(self, rng, dummy_images):
        g_vars = self.generator.init(rng, dummy_images, False)
        return {"params": g_vars["params"], "batch_stats": g_vars["batch_stats"],
                "opt_state": self.generator_optimizer.init(g_vars["params"])}

    @staticmethod
    def generator_variables(state) -> dict:
        """g's ``{'params', 'batch_stats'}`` in ``state``."""
        return {"params": state.method_state["params"],
                "batch_stats": state.method_state["batch_stats"]}

    # ---------------------------------------------------------------------------- theta1 step
    def train_step(self, state, batch, axis_name=None):
        """One update of the multi-task network on ``L_pri + aux_weight * L_aux`` (pass A); the
        generated labels are constants here and g's BatchNorm statistics are updated."""
        mask = batch.get("mask")
        soft, g_stats = maxl.generate_labels(self.generator, self.generator_variables(state),
                                             batch["image"], batch["primary"], self.psi,
                                             train=True, axis_name=axis_name, mask=mask)
        soft = jax.lax.stop_gradient(soft)

        def loss_fn(params):
            return maxl.multitask_loss(self.multitask, params, state.multitask_batch_stats,
                                       batch["image"], batch["primary"], soft,
                                       aux_weight=self.aux_weight, gamma=self.gamma,
                                       axis_name=axis_name, mask=mask)

        (loss, (f_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.multitask_params)
        new_state, norms = self.update_multitask(
            state, grads, f_stats, method_state={**state.method_state, "batch_stats": g_stats})
        return new_state, {
            "loss": loss, "primary_loss": parts["primary"], "auxiliary_loss": parts["auxiliary"],
            "accuracy": losses.accuracy(parts["primary_logits"], batch["primary"], axis_name, mask),
            **norms, **maxl.label_statistics(soft, batch["primary"], self.psi, axis_name, mask)}

    # ---------------------------------------------------------------------------- theta2 step
    def meta_step(self, state, batches, axis_name=None):
        """One meta update of the label generator on ``batches['train']`` (pass B)."""
        batch = batches["train"]
        alpha = self.inner_lr(state.meta_step)
        if self.meta_form == "reference_first_order":
            result = maxl.reference_first_order_meta_gradient(
                self.multitask, self.generator, state.multitask_variables,
                self.generator_variables(state), batch["image"], batch["primary"], self.psi,
                alpha=alpha, aux_weight=self.aux_weight, gamma=self.gamma,
                entropy_weight=self.entropy_weight, axis_name=axis_name, mask=batch.get("mask"))
        else:
            result = maxl.generator_meta_gradient(
                self.multitask, self.generator, state.multitask_variables,
                self.generator_variables(state), batch["image"], batch["primary"], self.psi,
                inner_optimizer=self.inner_optimizer(alpha), inner_steps=self.inner_steps,
                entropy_weight=self.entropy_weight, aux_weight=self.aux_weight, gamma=self.gamma,
                form=self.meta_form, axis_name=axis_name, mask=batch.get("mask"))
        params, opt_state, norms = steps.apply_update(
            self.generator_optimizer, state.method_state["params"],
            state.method_state["opt_state"], result.grad)
        new_state = state.replace(
            meta_step=state.meta_step + 1, multitask_batch_stats=result.multitask_batch_stats,
            method_state={"params": params, "batch_stats": result.generator_batch_stats,
                          "opt_state": opt_state})
        return new_state, {
            "meta_loss": result.meta_loss, **result.metrics, "inner_lr": jnp.asarray(alpha),
            **norms, **maxl.label_statistics(result.soft_labels, batch["primary"], self.psi,
                                             axis_name, batch.get("mask"))}

    def epoch_summary(self, means):
        meta = means.get("meta") or {}
        if "soft_label_sum" not in meta:
            return {}
        usage = maxl.block_usage(jnp.asarray(meta["soft_label_sum"]),
                                 jnp.asarray(meta["primary_count"]),
                                 jnp.asarray(meta["label_entropy_sum"]), self.psi)
        return {"label_usage": jax.tree_util.tree_map(lambda a: jax.device_get(a).tolist(), usage)}

"""WAMAL: weight-aware MAXL (So, Goldfeder & Lipson, OpenReview ``sRDCzh6gVw``; authors' code
``MatthewSo/rl-aux``, folder ``wamal/``: ``train_network.py``, ``networks/wamal_wrapper.py``).

MAXL (``maxl_jax.methods.maxl``) plus a per-example auxiliary weight. The label generator has a
second head on its backbone features, ``Dense(width) - ReLU - Dense(1) - sigmoid`` giving ``s``, and
each example's auxiliary loss is weighted by ``w = 2^(2 r s - r)`` (``r = weight_range``, 5 by
default: ``w`` in ``[1/32, 32]``):

    L_train = mean_b L_pri,b + mean_b (w_b * L_aux,b)

The meta step is MAXL's exact one-step second-order unroll: ``theta1+ = theta1 - alpha grad
L_train``, then ``d/d theta2 [L_pri(theta1+) + entropy_weight * H(soft labels)]``, which now reaches
the weight head through ``w`` as well as the label head through the soft labels.

The authors' defaults (``wamal/vgg16_cifar_100_20_wamal.py``): ``r = 5``; no normalisation of the
weights over the batch (``normalize_weights``: divide by the batch mean); no held-out auxiliary
split; primary learning rate 0.02 for theta1 and the inner step (ours default to MAXL's 0.01: set
``--config.lr=0.02 --config.inner_lr=0.02`` to follow them); generator SGD 1e-3, weight decay 5e-4;
entropy weight 0.2; the same schedules and two-pass epoch as MAXL. Published: CIFAR-100-20, VGG-16,
80.2 (abstract) / 81.3 (notebook, mean of the last 15 epochs) against MAXL about 76-77; a fixed
auxiliary weight of 4 gives MAXL 79.1 in the same notebook, so report a fixed-weight control beside
it (``--method=maxl --config.aux_weight=4``).

The weights' form (``weight_form``). The paper weights each example, ``mean_b (w_b * L_aux,b)``
(``"example"``, our default). The authors' code does something else: in ``wamal/train_network.py``
the weight head returns shape ``(B, 1)`` and the focal loss ``(B,)``, so ``mean(L * w)`` broadcasts
to ``(B, B)`` and equals ``mean(w) * mean(L)``: one learned weight per batch, not per example.
Every stored revision does this, so the published 80.2 / 81.3 came from a batch-level weight.
``--config.wamal.weight_form=batch`` is that form. With it and ``normalize_weights`` the weights
cancel (``mean(w / mean(w)) = 1``) and the weight head gets a zero meta-gradient (to round-off;
``tests/test_methods.py::test_wamal_authors_batch_weight_with_normalisation_has_zero_weight_head_gradient``):
their normalised runs are MAXL. We keep the paper's per-example form as the default, because it is
the method the paper describes and the only one whose weight head can tell examples apart; the
method benchmark runs it, and says so.

Where we differ from their code, deliberately: the mask softmax keeps the reference MAXL's 1e-8
off-block mass (their wrapper masks with exact zeros and adds 1e-12 to the denominator), so WAMAL
with ``w = 1`` is exactly MAXL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxl_jax import losses, maxl, steps, validation
from maxl_jax.methods import base
from maxl_jax.methods import register
from maxl_jax.meta import FORMS
from maxl_jax.methods.maxl import Maxl

WEIGHT_FORMS = ("example", "batch")


@register
class Wamal(Maxl):
    """MAXL with a per-example auxiliary weight head on the generator, exact second order.

    Attributes:
      weight_range: ``r``: weights ``2^(2 r s - r)`` lie in ``[2^-r, 2^r]``.
      normalize_weights: divide the weights by their batch mean.
      weight_form: ``"example"`` (the paper's ``mean(w * L_aux)``) or ``"batch"`` (the authors'
        code's ``mean(w) * mean(L_aux)``).
    """

    name = "wamal"
    report = Maxl.report + (("weight_mean", "mean auxiliary weight"),)

    weight_range: float = 5.0
    normalize_weights: bool = False
    weight_form: str = "example"
    meta_forms = FORMS

    def __post_init__(self):
        super().__post_init__()
        if not self.generator.weight_head:
            raise ValueError("WAMAL's label generator needs its weight head: build it with "
                             "models.make_networks(..., generator_weight_head=True)")
        if not self.weight_range > 0:
            raise ValueError(f"weight_range must be > 0, got {self.weight_range}")
        if self.meta_form not in FORMS:
            raise ValueError(f"WAMAL's meta_form must be one of {FORMS} (the reference's "
                             f"first-order step has no weight head), got {self.meta_form!r}")
        if self.weight_form not in WEIGHT_FORMS:
            raise ValueError(f"unknown weight_form {self.weight_form!r}; choose one of "
                             f"{WEIGHT_FORMS}")

    @classmethod
    def defaults(cls) -> dict:
        return {"weight_range": 5.0, "normalize_weights": False, "weight_form": "example"}

    @classmethod
    def check_fields(cls, fields) -> None:
        validation.check_range("weight_range", fields.weight_range, "float", 0.0, False,
                               prefix="wamal.")
        validation.check_choice("weight_form", fields.weight_form, WEIGHT_FORMS, prefix="wamal.",
                                meaning="per example, the paper; per batch, the authors' code")

    @classmethod
    def mode_of(cls, config) -> dict[str, str]:
        form = str(config.wamal.weight_form)
        return {**super().mode_of(config),
                "weight_form": ("example (the paper)" if form == "example"
                                else "batch (the authors' code)" if form == "batch" else form),
                "normalize_weights": str(bool(config.wamal.normalize_weights))}

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        return cls(**cls.fields_from_config(config, setup, weight_head=True),
                   weight_range=float(config.wamal.weight_range),
                   normalize_weights=bool(config.wamal.normalize_weights),
                   weight_form=str(config.wamal.weight_form))

    def _labels(self, state, batch, axis_name):
        return maxl.generate_labels(self.generator, self.generator_variables(state), batch["image"],
                                    batch["primary"], self.psi, train=True, axis_name=axis_name,
                                    weight_range=self.weight_range,
                                    normalize_weights=self.normalize_weights,
                                    mask=batch.get("mask"))

    def train_step(self, state, batch, axis_name=None):
        """One update of theta1 on ``L_pri + aux_weight * mean(w * L_aux)``; labels and weights are
        constants here."""
        (soft, w), g_stats = jax.lax.stop_gradient(self._labels(state, batch, axis_name))
        mask = batch.get("mask")

        def loss_fn(params):
            return maxl.multitask_loss(self.multitask, params, state.multitask_batch_stats,
                                       batch["image"], batch["primary"], soft,
                                       aux_weight=self.aux_weight, gamma=self.gamma,
                                       axis_name=axis_name, aux_example_weights=w,
                                       weight_form=self.weight_form, mask=mask)

        (loss, (f_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.multitask_params)
        new_state, norms = self.update_multitask(
            state, grads, f_stats, method_state={**state.method_state, "batch_stats": g_stats})
        return new_state, {
            "loss": loss, "primary_loss": parts["primary"], "auxiliary_loss": parts["auxiliary"],
            "accuracy": losses.accuracy(parts["primary_logits"], batch["primary"], axis_name, mask),
            **norms, **weight_statistics(w, axis_name, mask),
            **maxl.label_statistics(soft, batch["primary"], self.psi, axis_name, mask)}

    def meta_step(self, state, batches, axis_name=None):
        """One meta update of the generator (both heads) on ``batches['train']``."""
        batch = batches["train"]
        alpha = self.inner_lr(state.meta_step)
        result = maxl.generator_meta_gradient(
            self.multitask, self.generator, state.multitask_variables,
            self.generator_variables(state), batch["image"], batch["primary"], self.psi,
            inner_optimizer=self.inner_optimizer(alpha), inner_steps=self.inner_steps,
            entropy_weight=self.entropy_weight, aux_weight=self.aux_weight, gamma=self.gamma,
            form=self.meta_form, axis_name=axis_name, weight_range=self.weight_range,
            normalize_weights=self.normalize_weights, weight_form=self.weight_form,
            mask=batch.get("mask"))
        params, opt_state, norms = steps.apply_update(
            self.generator_optimizer, state.method_state["params"],
            state.method_state["opt_state"], result.grad)
        new_state = state.replace(
            meta_step=state.meta_step + 1, multitask_batch_stats=result.multitask_batch_stats,
            method_state={"params": params, "batch_stats": result.generator_batch_stats,
                          "opt_state": opt_state})
        return new_state, {
            "meta_loss": result.meta_loss, **result.metrics, "inner_lr": jnp.asarray(alpha),
            **norms, "weight_head_grad_norm": steps.global_norm(result.grad["weight_head"]),
            **weight_statistics(result.example_weights, axis_name, batch.get("mask")),
            **maxl.label_statistics(result.soft_labels, batch["primary"], self.psi, axis_name,
                                    batch.get("mask"))}


def weight_statistics(w: jax.Array, axis_name: str | None = None,
                      mask: jax.Array | None = None) -> dict:
    """Batch mean, minimum and maximum of the per-example weights ``w (B,)`` (real examples only)."""
    real = jnp.ones(w.shape, bool) if mask is None else mask > 0
    lo, hi = jnp.min(jnp.where(real, w, jnp.inf)), jnp.max(jnp.where(real, w, -jnp.inf))
    if axis_name is not None:
        lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    return {"weight_mean": losses.batch_mean(w, axis_name, mask), "weight_min": lo,
            "weight_max": hi}

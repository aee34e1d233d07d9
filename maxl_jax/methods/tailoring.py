"""Tailoring and meta-tailoring (Alet, Bauza, Kawaguchi, Kuru, Lozano-Perez & Kaelbling,
"Tailoring: encoding inductive biases by optimizing unsupervised objectives at prediction time",
NeurIPS 2021), with CNGrad's conditional normalisation.

CNGrad: a per-example affine ``h -> gamma * h + beta`` (one ``gamma``, ``beta`` per channel,
initialised at the identity ``gamma = 1, beta = 0``) is applied to the backbone's output features
``h (B, F)``, before the heads. At prediction time each input's ``(gamma, beta)`` alone takes
``inner_steps`` SGD steps of rate ``inner_lr`` on an unsupervised loss of that input, then the input
is classified with its adapted ``(gamma, beta)``; the network's weights never change. The examples
of a batch are adapted independently (``jax.vmap`` over one-example problems), so a prediction never
depends on the other inputs of its batch. The normalisation sits after the backbone, so the inner
steps run through the primary head only: the backbone runs once per input.

* ``tailoring``: trains like ``single`` (the primary loss); evaluates with tailoring.
* ``meta_tailoring``: the training loss is the primary loss AFTER the per-example inner adaptation,
  differentiated through the inner SGD steps (``maxl_jax.meta.core.unrolled_update``, the reverse
  unroll ``maxl_jax.meta.unroll.meta_gradient`` uses); ``first_order=True`` stops the gradient
  through the inner steps (the adapted ``(gamma, beta)`` taken as constants, first-order MAML's
  approximation). Evaluates with tailoring.

The unsupervised loss is a callable ``(logits (B, C), features (B, F), images (B, H, W, C)) -> (B,)``
(``tailor`` calls it on one-example batches). Built in (``LOSSES``):

* ``entropy`` (default): the Shannon entropy of the primary prediction, TENT's test-time objective
  (Wang, Shelhamer, Liu, Olshausen & Darrell, "Tent: fully test-time adaptation by entropy
  minimization", ICLR 2021), which also adapts only normalisation affine parameters. It is the
  default because it needs nothing but the input's own prediction (no augmentation, no second
  forward pass through the backbone) and fits any classifier.

Without a label the inner loss cannot know the class, so tailoring only helps where the bias it
encodes (confident predictions) holds; ``inner_steps=0`` is the plain network exactly.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from maxl_jax import losses, models, validation
from maxl_jax.meta import core
from maxl_jax.methods import base
from maxl_jax.methods import register

UnsupervisedLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def entropy_loss(logits: jax.Array, features: jax.Array, images: jax.Array) -> jax.Array:
    """Per-example entropy ``-sum_c p_c log p_c`` of the softmax of ``logits`` (TENT)."""
    del features, images
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
    return -jnp.sum(jnp.exp(logp) * logp, -1)


LOSSES: dict[str, UnsupervisedLoss] = {"entropy": entropy_loss}


def identity_cn(width: int, dtype=jnp.float32) -> dict:
    """CNGrad's conditional normalisation at the identity: ``gamma = 1``, ``beta = 0``, ``(F,)``."""
    return {"gamma": jnp.ones((width,), dtype), "beta": jnp.zeros((width,), dtype)}


def apply_cn(cn: dict, features: jax.Array) -> jax.Array:
    """``gamma * features + beta`` (per channel, the last axis)."""
    return (features * cn["gamma"].astype(features.dtype) + cn["beta"].astype(features.dtype))


def tailor(head_fn: Callable[[jax.Array], jax.Array], unsupervised_loss: UnsupervisedLoss,
           features: jax.Array, images: jax.Array, inner_steps: int, inner_lr: float,
           first_order: bool = False) -> tuple[jax.Array, dict]:
    """The per-example inner update: each example's ``(gamma, beta)`` takes ``inner_steps`` SGD
    steps of rate ``inner_lr`` on ``unsupervised_loss`` of its own prediction, independently of the
    other examples (``vmap``).

    Args:
      head_fn: ``features (B, F) -> logits (B, C)`` (the primary head, its parameters closed over).
      unsupervised_loss: ``(logits, features, images) -> (B,)``, called on one-example batches.
      features: ``(B, F)`` the backbone's output. images: ``(B, ...)``, passed to the loss.
      first_order: stop the gradient through the inner steps (the adapted parameters are treated
        as constants of the outer loss).

    Returns ``(logits (B, C) after adaptation, cn)`` with ``cn['gamma'], cn['beta']`` ``(B, F)``.
    Differentiable through the inner steps (an unrolled reverse-mode graph) unless ``first_order``.
    """
    width = features.shape[-1]
    dtype = jnp.promote_types(features.dtype, jnp.float32)  # float32 parameters, or float64

    def one(feat, image):
        cn = identity_cn(width, dtype)
        if inner_steps > 0:
            def inner(c):
                h = apply_cn(c, feat[None])
                return jnp.sum(unsupervised_loss(head_fn(h), h, image[None])), ()
            cn, _, _ = core.unrolled_update(inner, cn, optax.sgd(inner_lr), inner_steps)
            if first_order:
                cn = jax.lax.stop_gradient(cn)
        return head_fn(apply_cn(cn, feat[None]))[0], cn

    return jax.vmap(one)(features, images)


def split_apply(multitask: models.MultiTaskNet, params, batch_stats, images: jax.Array,
                train: bool, axis_name=None, mask=None):
    """``(features (B, F), head_fn, new_batch_stats)``: the multi-task network's backbone on
    ``images`` and its primary head as a function of the features (the same computation as
    ``multitask.apply``, split where the conditional normalisation goes)."""
    variables = {"params": params["backbone"], "batch_stats": batch_stats.get("backbone", {})}
    if train:
        features, updated = multitask.backbone.apply(variables, images, True, axis_name, mask,
                                                     mutable=["batch_stats"])
        new_stats = {**batch_stats, "backbone": updated["batch_stats"]}
    else:
        features, new_stats = multitask.backbone.apply(variables, images, False, axis_name,
                                                       mask), batch_stats
    head = models.Head(multitask.head_width, multitask.num_primary, multitask.kernel_init,
                       dtype=multitask.backbone.dtype, loss_scale=multitask.backbone.loss_scale)
    head_params = {"params": params["primary_head"]}
    return features, (lambda h: head.apply(head_params, h)), new_stats


def meta_tailoring_loss(multitask: models.MultiTaskNet, params, batch_stats, batch: base.Batch,
                        unsupervised_loss: UnsupervisedLoss, inner_steps: int, inner_lr: float,
                        gamma: float = 2.0, first_order: bool = False, axis_name=None):
    """The meta-tailoring objective: the batch-mean primary focal loss (``gamma``; 0: cross-entropy)
    of the predictions after each example's inner adaptation (``tailor``), in train mode.

    Returns ``(loss, (new_batch_stats, adapted_logits))``; differentiate it w.r.t. ``params``.
    """
    mask = batch.get("mask")
    features, head_fn, stats = split_apply(multitask, params, batch_stats, batch["image"], True,
                                           axis_name, mask)
    logits, _ = tailor(head_fn, unsupervised_loss, features, batch["image"], inner_steps,
                       inner_lr, first_order)
    one_hot = jax.nn.one_hot(batch["primary"], logits.shape[-1], dtype=logits.dtype)
    per_example = losses.focal_loss_per_example(jax.nn.log_softmax(logits, -1), one_hot, gamma)
    return losses.batch_mean(per_example, axis_name, mask), (stats, logits)


def tailored_logits(multitask, variables, images, unsupervised_loss, inner_steps, inner_lr):
    """Prediction with tailoring: primary logits ``(B, C)`` of ``images`` after each input's inner
    adaptation, with BatchNorm running statistics (``inner_steps=0``: the plain network)."""
    features, head_fn, _ = split_apply(multitask, variables["params"],
                                       variables.get("batch_stats", {}), images, False)
    return tailor(head_fn, unsupervised_loss, features, images, inner_steps, inner_lr)[0]


@register
class Tailoring(base.Method):
    """Single-task training; prediction with per-example CNGrad tailoring.

    Attributes:
      inner_steps: SGD steps of each input's ``(gamma, beta)`` at prediction time (and, for
        meta-tailoring, in training).
      inner_lr: their rate.
      loss: the built-in unsupervised loss's name (``LOSSES``).
      unsupervised_loss: a callable of your own instead (library use; ``None``: ``LOSSES[loss]``).
    """

    name = "tailoring"
    config_fields = ("psi", "aux_per_class")
    train_report = ()

    inner_steps: int = 1
    inner_lr: float = 0.1
    loss: str = "entropy"
    unsupervised_loss: UnsupervisedLoss | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.unsupervised_loss is None and self.loss not in LOSSES:
            raise ValueError(f"unknown tailoring loss {self.loss!r}; choose from {sorted(LOSSES)}")

    @property
    def objective(self) -> UnsupervisedLoss:
        return self.unsupervised_loss if self.unsupervised_loss is not None else LOSSES[self.loss]

    @classmethod
    def defaults(cls) -> dict:
        return {"inner_steps": 1, "inner_lr": 0.1, "loss": "entropy"}

    @classmethod
    def check_fields(cls, fields) -> None:
        validation.check_range("inner_steps", fields.inner_steps, "int", 0,
                               prefix=f"{cls.name}.")
        validation.check_range("inner_lr", fields.inner_lr, "float", 0, prefix=f"{cls.name}.")
        validation.check_choice("loss", fields.loss, tuple(LOSSES), prefix=f"{cls.name}.")

    @classmethod
    def mode_of(cls, config) -> dict[str, str]:
        sub = config[cls.name]
        return {**super().mode_of(config),
                "tailoring": f"CNGrad on the backbone's features, {int(sub.inner_steps)} SGD "
                             f"step(s) of rate {float(sub.inner_lr):g} per test input",
                "tailoring_loss": f"{sub.loss} ({'TENT' if sub.loss == 'entropy' else 'ours'})"}

    @classmethod
    def kwargs_of(cls, config) -> dict:
        sub = config[cls.name]
        return {"inner_steps": int(sub.inner_steps), "inner_lr": float(sub.inner_lr),
                "loss": str(sub.loss)}

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        multitask, _ = base.networks(config, setup, sum(base.psi_of(config, setup)))
        return cls(multitask=multitask, multitask_optimizer=base.multitask_optimizer(config, setup),
                   gamma=config.gamma, **cls.kwargs_of(config))

    def training_loss(self, params, batch_stats, batch, axis_name):
        mask = batch.get("mask")
        logits, _, stats = self.forward(params, batch_stats, batch["image"], axis_name, mask)
        loss = losses.batch_mean(self.primary_losses(logits, batch["primary"]), axis_name, mask)
        return loss, (stats, logits)

    def train_step(self, state, batch, axis_name=None):
        (loss, (stats, logits)), grads = jax.value_and_grad(self.training_loss, has_aux=True)(
            state.multitask_params, state.multitask_batch_stats, batch, axis_name)
        new_state, norms = self.update_multitask(state, grads, stats)
        return new_state, {"loss": loss, "primary_loss": loss,
                           "accuracy": losses.accuracy(logits, batch["primary"], axis_name,
                                                       batch.get("mask")), **norms}

    def predict(self, variables, images: jax.Array) -> jax.Array:
        """Tailored primary logits of ``images`` (eval mode)."""
        return tailored_logits(self.multitask, variables, images, self.objective,
                               self.inner_steps, self.inner_lr)

    def eval_step(self, state, batch, axis_name=None):
        """``base.Method.eval_step``'s sums, on the tailored predictions."""
        logits = self.predict(state.multitask_variables, batch["image"])
        mask = batch.get("mask", jnp.ones(batch["primary"].shape, jnp.float32))
        per_example = self.primary_losses(logits, batch["primary"])
        correct = (jnp.argmax(logits, -1) == batch["primary"]).astype(jnp.float32)
        sums = {"correct": jnp.sum(correct * mask), "loss_sum": jnp.sum(per_example * mask),
                "count": jnp.sum(mask)}
        return sums if axis_name is None else jax.lax.psum(sums, axis_name)


@register
class MetaTailoring(Tailoring):
    """Meta-tailoring: trains the primary loss after the inner adaptation (through it, or first
    order); prediction with tailoring."""

    name = "meta_tailoring"
    first_order: bool = False

    @classmethod
    def defaults(cls) -> dict:
        return {**super().defaults(), "first_order": False}

    @classmethod
    def mode_of(cls, config) -> dict[str, str]:
        first = bool(config[cls.name].first_order)
        return {**super().mode_of(config),
                "meta_gradient": "first order (no gradient through the inner steps)" if first
                else "exact (reverse-mode unroll through the inner steps)"}

    @classmethod
    def kwargs_of(cls, config) -> dict:
        return {**super().kwargs_of(config), "first_order": bool(config[cls.name].first_order)}

    def training_loss(self, params, batch_stats, batch, axis_name):
        return meta_tailoring_loss(self.multitask, params, batch_stats, batch, self.objective,
                                   self.inner_steps, self.inner_lr, self.gamma, self.first_order,
                                   axis_name)

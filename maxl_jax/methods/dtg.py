"""DTG-AuxL: joint data-task generation for auxiliary learning (Chen, Wang, Zhou, Qin, Guan & Zhu,
"Joint Data-Task Generation for Auxiliary Learning", NeurIPS 2023). No public code exists; this is
built from the paper's description, and every choice it leaves open is written down below.

What the paper fixes (abstract and method overview):

* a *joint generator* of two parts: a **feature generator** that produces new auxiliary instances in
  the task model's feature space (so the framework applies to any input modality), and a **label
  generator** that gives those generated instances their auxiliary labels (the generated task);
* a **bi-level** optimisation: the task model theta is trained in the lower level on the primary data
  *plus* the generated data and labels; the joint generator phi is trained in the upper level by the
  **implicit gradient** of the primary loss (IFT, as the authors' earlier MAOAL/JTDS, i.e. the
  AuxiLearn estimator) plus the **explicit gradient of an instance regularisation**.

Our instantiation (for the multi-task network ``backbone -> primary head, auxiliary head``):

* Generated instances (feature generator, ``Head(hidden, D)`` MLP, ``D`` the backbone's feature
  width): for each real training example ``i`` with backbone features ``h_i``, one generated feature
  ``h~_i = h_i + G_f(sg(h_i))``. *Choice*: the generated instance lives where the backbone's features
  enter the heads and is **anchored** to a real instance: a feature-space vector that did not depend
  on theta could only train the auxiliary head, which is not shared with the primary task, so the
  primary loss could never see it (the implicit gradient would be exactly 0). Through the anchor the
  auxiliary loss on ``h~_i`` trains the backbone (``dh~/dtheta = dh/dtheta``), while the generator
  sees the real features as constants (``sg``: stop-gradient), so theta's gradient does not run
  through ``G_f``. *Choice*: no noise input (one deterministic generated instance per real one): a
  noise stream would have to be identical for any sharding of the batch over devices, and the
  per-instance displacement already makes the generated set differ from the real one.
* Generated labels (label generator, ``Head(hidden, sum(psi))`` MLP on ``sg(h~_i)``): MAXL's
  hierarchical mask softmax ``y~_i = mask_softmax(G_l(h~_i), y_i, psi)``: a generated instance inherits
  its source's primary class ``y_i`` and gets a soft label over that class's block of ``psi``
  auxiliary classes (*choice*: the paper's label generator is conditioned on the primary task; the
  block structure is the library's common one, ``--config.psi`` / ``aux_per_class``, 5 per class).
* Lower level (one SGD step of theta per batch, the multi-task optimizer of every method):
  ``L_T(theta; phi) = mean_i l_pri(f_pri(h_i), y_i) + aux_weight * mean_i l_aux(f_aux(h~_i), y~_i)``
  (focal losses, ``gamma``; ``aux_weight`` the shared ``--config.aux_weight``, 1). *Choice*: the real
  images get no auxiliary loss: the auxiliary task exists only on generated data.
* Upper level, every ``every`` training steps (10, MAOAL's interval): ``L_A`` = primary loss of one
  batch of a held-out split (a stratified ``held_out_fraction`` = 5% of the training set, MAOAL's dev
  split), ``L_T`` on another training batch; the hypergradient is

      grad_phi = -(dL_A/dtheta) J^-1 dG/dphi  +  grad_phi R(phi),   G(theta, phi) = grad_theta L_T

  at the current theta treated as the inner optimum (``maxl_jax.meta.implicit_gradient``: Neumann
  series of ``terms`` = 3 terms, step ``alpha`` = the primary learning rate, and, as AuxiLearn's and
  MAOAL's code on which the authors build, without the leading ``alpha``: ``scale_by_alpha=False``,
  so the implicit part is the IFT value / alpha). ``G`` is the lower level's update direction with
  the generated data made from theta's own features (treated as targets when differentiating
  ``L_T``, as the training step does), and its Jacobian ``J = dG/dtheta`` includes how the generated
  instances and labels move with theta: the lower level's fixed point is ``G = 0`` with the data
  regenerated at every step. ``J`` is therefore not symmetric (not the Hessian of ``L_T``); the
  estimator applies ``J^T`` by one vector-Jacobian product, and only the Neumann series is offered
  (conjugate gradient needs a symmetric matrix). *Choice*, as AuxiLearn: theta in the IFT is the
  backbone and the primary head; the auxiliary head is held fixed (``L_A`` does not depend on it;
  it keeps ``J`` to the parameters the primary loss uses).
* The instance regulariser ``R`` (explicit gradient; the paper names it but its form is not
  available to us), on the same training batch's real features ``h`` (constants):

      R(phi) = proximity_weight * mean_i ||h~_i - h_i||^2 / mean_i ||h_i||^2
               + entropy_weight * sum_k pbar_k log pbar_k,     pbar = mean_i y~_i.

  The first term is per instance: it keeps each generated instance near its source, i.e. on the
  real feature distribution and inside the region where its inherited primary class is plausible
  (without it the implicit gradient alone can push ``h~`` anywhere the auxiliary head's loss is
  useful to the backbone, including far off the data, where the features it teaches do not transfer).
  It is relative to the features' own scale so its weight does not depend on the backbone's width.
  The second is MAXL's anti-collapse term on the generated labels (``--config.entropy_weight``, 0.2),
  which keeps the generated task from collapsing to one auxiliary class per primary class (then
  ``y~`` carries no information beyond ``y``). ``proximity_weight = 1`` is untuned.
* phi's optimizer: gradient clipped to global norm ``clip`` (10, MAOAL's), then Adam with
  ``meta_lr`` (1e-3; MAOAL uses Adam for its upper level). Generator weights Xavier-normal, zero
  biases (MAXL's generator initialisation); ``hidden`` (0: the multi-task head width) is the width
  of both generator MLPs. The generators have no BatchNorm.

The paper's own hyperparameters and results could not be read here (only its abstract); every
number above is ours or borrowed as stated. Where we are like AuxiLearn here: BatchNorm uses batch statistics in the meta step's forwards, and
its running statistics are not updated there; padding examples (``batch['mask'] == 0``) are left out
of every mean, BatchNorm statistic and the regulariser.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from maxl_jax import hierarchy, losses, maxl, meta, models, steps, validation
from maxl_jax.methods import base
from maxl_jax.methods import register


class JointGenerator(nn.Module):
    """phi: the feature generator and the label generator, on real features ``h (B, D)``.

    Returns ``(delta, logits)``: the displacement ``G_f(h) (B, D)`` (the generated feature is
    ``h + delta``) and the label generator's logits ``G_l(h + delta) (B, num_auxiliary)`` (the mask
    softmax over ``psi`` turns them into soft labels).
    """

    num_auxiliary: int
    hidden: int
    kernel_init: models.Initializer = models.XAVIER_NORMAL
    dtype: Any = None  # the compute dtype (the config's, as the task model's); None: no casts

    @nn.compact
    def __call__(self, h: jax.Array):
        delta = models.Head(self.hidden, h.shape[-1], self.kernel_init, dtype=self.dtype,
                            name="feature")(h)
        logits = models.Head(self.hidden, self.num_auxiliary, self.kernel_init, dtype=self.dtype,
                             name="label")(h + delta)
        return delta, logits


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


@register
class Dtg(base.Method):
    """DTG-AuxL: generated auxiliary instances (feature space) and their labels, learned by the
    implicit hypergradient of the held-out primary loss plus an instance regulariser's gradient.

    Attributes:
      generator: the joint generator phi (``JointGenerator``, ``sum(psi)`` label outputs).
      psi: the hierarchy of the generated labels.
      meta_optimizer: optax transformation for phi (clip, Adam).
      aux_weight: the generated task's weight in the lower-level loss.
      proximity_weight, entropy_weight: the regulariser's two weights (0 and 0: implicit part alone).
      solver, terms, alpha, scale_by_alpha, damping: the implicit estimator's
        (``meta.implicit_gradient``): Neumann J = 3, no damping by default (as AuxiLearn's and
        MAOAL's code); ``solver="cg", terms=30`` with a damping above ``-lambda_min(H)`` converges
        (``benchmarks/implicit_hypergradients.py``).
    """

    name = "dtg"
    config_fields = ("psi", "aux_per_class", "aux_weight", "entropy_weight")
    train_checked = base.Method.train_checked + ("auxiliary_loss",)
    meta_checked = ("meta_loss", "train_loss", "regulariser", "grad_norm", "update_norm")
    report = (("meta_loss", "held-out primary loss"), ("regulariser", "instance regulariser"),
              ("proximity", "relative displacement"))

    generator: JointGenerator
    psi: Sequence[int]
    meta_optimizer: optax.GradientTransformation
    aux_weight: float = 1.0
    proximity_weight: float = 1.0
    entropy_weight: float = 0.2
    terms: int = 3
    alpha: float = 0.01
    scale_by_alpha: bool = False
    solver: str = "neumann"
    damping: float = 0.0
    schedule: base.MetaSchedule = base.MetaSchedule(every=10, sources=("held_out", "train"))
    held_out_fraction: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "psi", hierarchy.validate_psi(self.psi, self.num_primary))
        if not self.multitask.num_auxiliary == self.generator.num_auxiliary == sum(self.psi):
            raise ValueError(f"the auxiliary head ({self.multitask.num_auxiliary}) and the label "
                             f"generator ({self.generator.num_auxiliary}) need sum(psi) = "
                             f"{sum(self.psi)} outputs")
        for key in ("aux_weight", "proximity_weight", "entropy_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.solver not in meta.SOLVERS:
            raise ValueError(f"unknown implicit solver {self.solver!r}; choose one of "
                             f"{meta.SOLVERS}")
        if set(self.schedule.sources) != {"held_out", "train"}:
            raise ValueError("dtg's meta step takes a 'held_out' and a 'train' batch")

    # ------------------------------------------------------------------ building from a config
    @classmethod
    def defaults(cls) -> dict:
        return {"every": 10, "held_out_fraction": 0.05, "meta_lr": 1e-3, "clip": 10.0,
                "proximity_weight": 1.0, "hidden": 0, "terms": 3,
                "scale_by_alpha": False, "solver": "neumann", "damping": 0.0}

    @classmethod
    def check_fields(cls, fields) -> None:
        where = f"{cls.name}."
        validation.check_range("every", fields.every, "int", 1, prefix=where)
        validation.check_range("held_out_fraction", fields.held_out_fraction, "float", 0.0, False,
                               high=0.9, prefix=where)
        validation.check_range("meta_lr", fields.meta_lr, "float", 0.0, False, prefix=where)
        validation.check_range("clip", fields.clip, "float", 0.0, False, prefix=where)
        validation.check_range("proximity_weight", fields.proximity_weight, "float", 0.0,
                               prefix=where)
        validation.check_range("hidden", fields.hidden, "int", 0, prefix=where)
        validation.check_range("terms", fields.terms, "int", 0, prefix=where)
        validation.check_choice("solver", fields.solver, meta.SOLVERS, prefix=where,
                                meaning="the implicit estimator's inverse")
        validation.check_range("damping", fields.damping, "float", 0.0, prefix=where)

    @classmethod
    def mode_of(cls, config) -> dict[str, str]:
        return {**super().mode_of(config),
                "hypergradient": base.implicit_estimator_mode(config[cls.name])}

    @classmethod
    def held_out_fraction_of(cls, config) -> float:
        return float(config[cls.name].held_out_fraction)

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        c = config[cls.name]
        psi = base.psi_of(config, setup)
        multitask, _ = base.networks(config, setup, sum(psi))
        generator = JointGenerator(sum(psi), int(c.hidden) or multitask.head_width,
                                   dtype=multitask.backbone.dtype)
        meta_opt = optax.chain(optax.clip_by_global_norm(float(c.clip)),
                               optax.adam(float(c.meta_lr)))
        return cls(multitask=multitask, multitask_optimizer=base.multitask_optimizer(config, setup),
                   gamma=config.gamma, generator=generator, psi=psi, meta_optimizer=meta_opt,
                   aux_weight=float(config.aux_weight), entropy_weight=float(config.entropy_weight),
                   proximity_weight=float(c.proximity_weight), terms=int(c.terms), alpha=float(config.lr),
                   scale_by_alpha=bool(c.scale_by_alpha), solver=str(c.solver),
                   damping=float(c.damping),
                   schedule=base.MetaSchedule(every=int(c.every), sources=("held_out", "train")),
                   held_out_fraction=float(c.held_out_fraction))

    @property
    def aux_sizes(self) -> tuple[int, ...]:
        return (sum(self.psi),)

    def init_method_state(self, rng, dummy_images):
        features = jax.eval_shape(lambda x: self.multitask.backbone.init_with_output(
            jax.random.PRNGKey(0), x, False)[0], dummy_images)  # shapes only, nothing computed
        params = self.generator.init(rng, jnp.zeros(features.shape, jnp.float32))["params"]
        return {"generator": params, "opt_state": self.meta_optimizer.init(params)}

    # ---------------------------------------------------------------------- the pieces of f
    def features(self, params, batch_stats, images, axis_name=None, mask=None):
        """The backbone's features ``h (B, D)`` in train mode and its new BatchNorm statistics."""
        h, updated = self.multitask.backbone.apply(
            {"params": params["backbone"], "batch_stats": batch_stats["backbone"]}, images, True,
            axis_name, mask, mutable=["batch_stats"])
        return h, {"backbone": updated["batch_stats"]}

    def head(self, params, which: str, h):
        """The ``"primary"`` or ``"auxiliary"`` head of f on features ``h``."""
        k = self.num_primary if which == "primary" else self.multitask.num_auxiliary
        return models.Head(self.multitask.head_width, k).apply({"params": params[f"{which}_head"]},
                                                               h)

    def generate(self, gen_params, h, primary):
        """Generated features' displacements ``(B, D)`` and soft labels ``(B, sum(psi))`` for real
        features ``h`` (constants) of examples of primary classes ``primary``."""
        delta, logits = self.generator.apply({"params": gen_params}, h)
        return delta, losses.mask_softmax(logits, primary, self.psi)

    # ------------------------------------------------------------------------- the losses
    def lower_loss(self, params, batch_stats, batch, gen_params, axis_name=None, generated=None):
        """``L_T``: the primary loss on the real examples plus ``aux_weight`` x the auxiliary head's
        loss on the generated features with the generated labels.

        The generated ``(delta, soft)`` come from ``gen_params`` on these features (as constants),
        or are ``generated`` when given. Returns ``(loss, (new_batch_stats, primary_logits,
        parts))``; ``parts`` holds the two losses, the generated labels and displacements, and the
        real features (constants).
        """
        mask = batch.get("mask")
        h, stats = self.features(params, batch_stats, batch["image"], axis_name, mask)
        h_const = jax.lax.stop_gradient(h)
        if generated is None:
            generated = self.generate(gen_params, h_const, batch["primary"])
        delta, soft = generated
        logits = self.head(params, "primary", h)
        aux_logits = self.head(params, "auxiliary", h + delta)
        primary = losses.batch_mean(self.primary_losses(logits, batch["primary"]), axis_name, mask)
        auxiliary = losses.batch_mean(losses.focal_loss_per_example(
            jax.nn.log_softmax(aux_logits, -1), soft, self.gamma), axis_name, mask)
        parts = {"primary": primary, "auxiliary": auxiliary, "soft": soft, "delta": delta,
                 "h": h_const}
        return primary + self.aux_weight * auxiliary, (stats, logits, parts)

    def regulariser(self, gen_params, h, primary, axis_name=None, mask=None):
        """``R(phi)`` on real features ``h`` (constants): ``proximity_weight`` x the mean squared
        displacement relative to the mean squared feature norm, plus ``entropy_weight`` x MAXL's
        negative entropy of the batch-mean generated label. Returns ``(R, parts)``."""
        delta, soft = self.generate(gen_params, h, primary)
        scale = losses.batch_mean(jnp.sum(jnp.square(h), -1), axis_name, mask)
        proximity = (losses.batch_mean(jnp.sum(jnp.square(delta), -1), axis_name, mask)
                     / jnp.maximum(scale, 1e-12))
        balance = losses.entropy_term(soft, axis_name, mask)
        value = self.proximity_weight * proximity + self.entropy_weight * balance
        return value, {"proximity": proximity, "label_balance": balance, "soft": soft}

    # --------------------------------------------------------------------------- the steps
    def train_step(self, state, batch, axis_name=None):
        """One update of theta on ``L_T`` (the generator's outputs are constants here)."""
        gen = jax.lax.stop_gradient(state.method_state["generator"])
        (loss, (stats, logits, parts)), grads = jax.value_and_grad(
            lambda p: self.lower_loss(p, state.multitask_batch_stats, batch, gen, axis_name),
            has_aux=True)(state.multitask_params)
        new_state, norms = self.update_multitask(state, grads, stats)
        mask = batch.get("mask")
        return new_state, {
            "loss": loss, "primary_loss": parts["primary"], "auxiliary_loss": parts["auxiliary"],
            "accuracy": losses.accuracy(logits, batch["primary"], axis_name, mask), **norms}

    def hypergradient(self, state, batches, axis_name=None):
        """The upper-level gradient w.r.t. the generator: the implicit part (``L_A`` on
        ``batches['held_out']``, ``L_T`` on ``batches['train']``, theta without the auxiliary head)
        plus the regulariser's explicit gradient on the training batch's real features.

        Returns ``(grads, implicit, explicit, result, reg_parts)``.
        """
        held, batch = batches["held_out"], batches["train"]
        params, stats = state.multitask_params, state.multitask_batch_stats
        gen = state.method_state["generator"]
        aux_head = params["auxiliary_head"]
        shared = {k: v for k, v in params.items() if k != "auxiliary_head"}

        def grad_map(w, g):
            # G(theta, phi) = dL_T/dtheta' at theta' = theta with the generated data made from
            # theta's own features: its Jacobian in theta includes the generated data's dependence
            # on theta (the fixed point of the lower level's updates), so it is not symmetric.
            h, _ = self.features({**w, "auxiliary_head": aux_head}, stats, batch["image"],
                                 axis_name, batch.get("mask"))
            generated = self.generate(g, h, batch["primary"])
            (loss, (_, _, parts)), grad = jax.value_and_grad(
                lambda w2: self.lower_loss({**w2, "auxiliary_head": aux_head}, stats, batch, g,
                                           axis_name, generated), has_aux=True)(w)
            return grad, (loss, parts)

        def outer_loss(w, g):
            logits, _, _ = self.forward({**w, "auxiliary_head": aux_head}, stats, held["image"],
                                        axis_name, held.get("mask"))
            return losses.batch_mean(self.primary_losses(logits, held["primary"]), axis_name,
                                     held.get("mask")), {}

        result = meta.implicit_gradient(None, outer_loss, shared, gen, solver=self.solver,
                                        terms=self.terms, alpha=self.alpha,
                                        scale_by_alpha=self.scale_by_alpha, damping=self.damping,
                                        grad_map=grad_map)
        inner_loss, parts = result.inner_aux
        result = result._replace(inner_loss=inner_loss, inner_aux=parts)
        h = parts["h"]
        (reg, reg_parts), explicit = jax.value_and_grad(self.regulariser, has_aux=True)(
            gen, h, batch["primary"], axis_name, batch.get("mask"))
        reg_parts = {**reg_parts, "value": reg}
        grads = jax.tree_util.tree_map(jnp.add, result.grad_hyper, explicit)
        return grads, result.grad_hyper, explicit, result, reg_parts

    def meta_step(self, state, batches, axis_name=None):
        """One update of the joint generator along the upper-level gradient."""
        grads, implicit, explicit, result, reg = self.hypergradient(state, batches, axis_name)
        gen, opt_state, norms = steps.apply_update(self.meta_optimizer,
                                                   state.method_state["generator"],
                                                   state.method_state["opt_state"], grads)
        new_state = state.replace(meta_step=state.meta_step + 1,
                                  method_state={"generator": gen, "opt_state": opt_state})
        batch = batches["train"]
        return new_state, {
            "meta_loss": result.outer_loss, "train_loss": result.inner_loss,
            "auxiliary_loss": result.inner_aux["auxiliary"], "regulariser": reg["value"],
            "proximity": reg["proximity"], "label_balance": reg["label_balance"],
            "implicit_norm": global_norm(implicit), "explicit_norm": global_norm(explicit),
            **norms, **maxl.label_statistics(reg["soft"], batch["primary"], self.psi, axis_name,
                                             batch.get("mask"))}

    def epoch_summary(self, means):
        meta_means = means.get("meta") or {}
        if "soft_label_sum" not in meta_means:
            return {}
        usage = maxl.block_usage(jnp.asarray(meta_means["soft_label_sum"]),
                                 jnp.asarray(meta_means["primary_count"]),
                                 jnp.asarray(meta_means["label_entropy_sum"]), self.psi)
        return {"label_usage": jax.tree_util.tree_map(lambda a: jax.device_get(a).tolist(), usage)}

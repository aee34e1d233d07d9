"""AuxiLearn (Navon, Achituve, Maron, Chechik & Fetaya, "Auxiliary Learning by Implicit
Differentiation", ICLR 2021; authors' code ``AvivNavon/AuxiLearn``: ``auxilearn/implicit_diff.py``,
``auxilearn/optim.py``, ``auxilearn/hypernet.py``, ``experiments/oxford_pet/trainer.py``).

A bi-level problem (eq. 1-2 of the paper): ``phi* = argmin_phi L_A(theta*(phi))`` with
``theta*(phi) = argmin_theta L_T(theta, phi)``. ``L_A`` is the primary loss on a held-out auxiliary
split of the training set; ``L_T`` is the training loss that ``phi`` produces. The hypergradient is
the implicit one (eq. 3-4, ``maxl_jax.meta.implicit_gradient``) at the current theta, treated as the
inner optimum: ``dL_A/dphi = -(dL_A/dtheta) H^-1 d^2 L_T / dtheta dphi``, ``H^-1`` by a truncated
Neumann series (``J = 3`` terms, step ``alpha`` = the primary learning rate, and, as their
``Hypergrad._approx_inverse_hvp``, without the leading ``alpha``: ``scale_by_alpha=False``).
Two variants, registered as two methods:

* ``auxilearn`` ("combine", section 3.1): ``phi`` is a loss combiner mapping each example's loss
  vector ``l = (l_pri, l_aux_1..T)`` (the auxiliary tasks from the data, ``--config.aux_tasks``) to a
  scalar. ``linear``: ``L_T = mean_b (w . l_b) + mean_b l_pri,b`` (weights initialised to 1, the skip
  connection on the primary loss on, as their ``MonoLinearHyperNet``); ``nonlinear``: a monotone MLP
  ``L_T = mean_b net(l_b) + mean_b l_pri,b`` (softplus, hidden sizes ``10,10``, weights drawn
  uniform in ``[0, 0.2]``, biases 0, no bias on the output, as their ``MonoNonlinearHyperNet``).
  After each meta step the combiner's weights are clamped at 0 (``clamp()``), which keeps it
  monotone in every loss.
* ``auxilearn_generate`` ("generate", section 3.2): ``phi`` is a label generator like MAXL's (its own
  backbone, a head, the mask softmax over ``psi``) plus the linear combiner over
  ``(l_pri, aux_scale * l_aux)``, ``aux_scale = 0.25``. The auxiliary head is left out of theta in the
  hypergradient (their ``W`` excludes ``classifier2``), in both variants here.

The meta step, every ``every`` training steps (30 in their Pet experiment), takes one batch of the
held-out split for ``L_A`` and one other training batch for ``L_T``; the hypergradient is clipped to
global norm ``clip`` (10, ``MetaOptimizer``'s default; their Pet run passes 50), then SGD lr 1e-3,
momentum 0.9, weight decay 5e-3 (their Pet defaults). The held-out split is a stratified 5% of the
training set by default (their Pet run holds out a fixed handful of images per class; NYUv2 2.5%):
the data layer draws it from the seed and records it in the checkpoint. Published low-data results
(5% of the training set, 3 runs): CIFAR-10 single 50.8, MAXL 58.2, AuxiLearn 60.7.

Where we differ from their code: BatchNorm uses batch statistics in the meta step's forwards but
their running statistics are not updated there (theirs are, twice per meta step); the multi-task
network keeps the reference MAXL optimizer (SGD 0.01) rather than their SGD with momentum and weight
decay, so that methods compare on one footing.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from maxl_jax import hierarchy, losses, meta, models, steps, validation
from maxl_jax.methods import base
from maxl_jax.methods import register
from maxl_jax.methods.equal import default_tasks

COMBINERS = ("linear", "nonlinear")


# ------------------------------------------------------------------------------ the combiners


def init_combiner(kind: str, num_losses: int, rng: jax.Array, hidden=(10, 10),
                  init_upper: float = 0.2) -> dict:
    """Parameters of a ``linear`` (``{"w": ones (L,)}``) or monotone ``nonlinear`` combiner (layers
    ``{"w0", "b0", ..., "wN"}``, weights uniform in ``[0, init_upper]``, biases 0, no output bias)."""
    if kind == "linear":
        return {"w": jnp.ones((num_losses,), jnp.float32)}
    if kind != "nonlinear":
        raise ValueError(f"unknown combiner {kind!r}; choose one of {COMBINERS}")
    dims = (num_losses, *hidden, 1)
    keys = jax.random.split(rng, len(dims) - 1)
    params = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        params[f"w{i}"] = jax.random.uniform(keys[i], (a * b,), jnp.float32, 0.0,
                                             init_upper).reshape(a, b)
        if i < len(dims) - 2:
            params[f"b{i}"] = jnp.zeros((b,), jnp.float32)
    return params


def combine(params: dict, per_example: jax.Array, axis_name: str | None = None,
            mask: jax.Array | None = None) -> jax.Array:
    """``L_T``: the combiner applied to each example's losses ``(B, L)`` (column 0 the primary),
    averaged over the batch, plus the skip connection ``mean_b l_pri,b``."""
    if "w" in params:
        out = per_example @ params["w"]
    else:
        n = sum(k.startswith("w") for k in params)
        h = per_example
        for i in range(n):
            h = h @ params[f"w{i}"]
            if i < n - 1:
                h = jax.nn.softplus(h + params[f"b{i}"])
        out = h[:, 0]
    return (losses.batch_mean(out, axis_name, mask)
            + losses.batch_mean(per_example[:, 0], axis_name, mask))


def clamp_combiner(params: dict) -> dict:
    """Weights clamped at 0 (biases kept): the combiner stays monotone in every loss."""
    return {k: (jnp.maximum(v, 0.0) if k.startswith("w") else v) for k, v in params.items()}


def effective_weights(params: dict, per_example: jax.Array, axis_name: str | None = None,
                      mask: jax.Array | None = None):
    """``d L_T / d l_k`` averaged over the batch, ``(L,)``: what each loss weighs in the update."""
    grad = jax.grad(lambda l: combine(params, l, None))(per_example) * per_example.shape[0]
    return losses.batch_mean(grad, axis_name, mask)


# --------------------------------------------------------------------------- the combine variant


@register
class AuxiLearn(base.Method):
    """AuxiLearn, combine variant: a loss combiner learned by the implicit hypergradient.

    Attributes:
      combiner: ``"linear"`` or ``"nonlinear"``; hidden / init_upper: the nonlinear combiner's.
      meta_optimizer: optax transformation for phi (clip, weight decay, SGD with momentum).
      solver, terms, scale_by_alpha, damping: the implicit estimator's (``meta.implicit_gradient``;
        ``damping`` 0 and Neumann J = 3 are the authors', ``solver="cg", terms=30`` with a damping
        above ``-lambda_min(H)`` the converged option of ``benchmarks/implicit_hypergradients.py``).
      alpha: the Neumann step (the primary learning rate).
    """

    name = "auxilearn"
    config_fields = ("aux_tasks", "psi", "aux_per_class")
    learned: ClassVar[tuple[str, ...]] = ("combiner",)  # what of method_state the meta step learns
    meta_checked = ("meta_loss", "train_loss", "grad_norm", "update_norm")
    report = (("meta_loss", "held-out primary loss"), ("train_loss", "combined training loss"))

    meta_optimizer: optax.GradientTransformation
    combiner: str = "linear"
    hidden: tuple[int, ...] = (10, 10)
    init_upper: float = 0.2
    solver: str = "neumann"
    terms: int = 3
    alpha: float = 0.01
    scale_by_alpha: bool = False
    damping: float = 0.0
    schedule: base.MetaSchedule = base.MetaSchedule(every=30, sources=("held_out", "train"))
    held_out_fraction: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        if self.combiner not in COMBINERS:
            raise ValueError(f"unknown combiner {self.combiner!r}; choose one of {COMBINERS}")
        if self.solver not in meta.SOLVERS:
            raise ValueError(f"unknown implicit solver {self.solver!r}; choose one of "
                             f"{meta.SOLVERS}")

    @classmethod
    def defaults(cls) -> dict:
        return {"combiner": "linear", "hidden": "10,10", "every": 30, "held_out_fraction": 0.05,
                "meta_lr": 1e-3, "meta_momentum": 0.9, "meta_weight_decay": 5e-3, "clip": 10.0,
                "solver": "neumann", "terms": 3, "scale_by_alpha": False, "damping": 0.0}

    @classmethod
    def check_fields(cls, fields) -> None:
        where = f"{cls.name}."
        if "combiner" in fields and fields.combiner not in COMBINERS:
            raise validation.ConfigError(f"--config.{where}combiner={fields.combiner!r} is not one "
                                         f"of {COMBINERS}")
        if "hidden" in fields:
            try:
                hidden = [int(h) for h in str(fields.hidden).split(",")]
            except ValueError:
                hidden = [0]
            if not hidden or min(hidden) < 1:
                raise validation.ConfigError(
                    f"--config.{where}hidden={fields.hidden!r} is not a comma-separated list of "
                    f"layer sizes >= 1 (e.g. '10,10')")
        if fields.solver not in meta.SOLVERS:
            raise validation.ConfigError(f"--config.{where}solver={fields.solver!r} is not one of "
                                         f"{meta.SOLVERS}")
        validation.check_range("every", fields.every, "int", 1, prefix=where)
        validation.check_range("held_out_fraction", fields.held_out_fraction, "float", 0.0, False,
                               high=0.9, prefix=where)
        validation.check_range("meta_lr", fields.meta_lr, "float", 0.0, False, prefix=where)
        validation.check_range("meta_momentum", fields.meta_momentum, "float", 0.0, high=0.999,
                               prefix=where)
        validation.check_range("meta_weight_decay", fields.meta_weight_decay, "float", 0.0,
                               prefix=where)
        validation.check_range("clip", fields.clip, "float", 0.0, False, prefix=where)
        validation.check_range("terms", fields.terms, "int", 0, prefix=where)
        validation.check_range("damping", fields.damping, "float", 0.0, prefix=where)
        if "aux_scale" in fields:
            validation.check_range("aux_scale", fields.aux_scale, "float", 0.0, prefix=where)

    @classmethod
    def mode_of(cls, config) -> dict[str, str]:
        return {**super().mode_of(config),
                "hypergradient": base.implicit_estimator_mode(config[cls.name])}

    @classmethod
    def held_out_fraction_of(cls, config) -> float:
        return float(config[cls.name].held_out_fraction)

    @classmethod
    def common_fields(cls, config, setup: base.Setup) -> dict:
        c = config[cls.name]
        meta_opt = optax.chain(optax.clip_by_global_norm(float(c.clip)),
                               optax.add_decayed_weights(float(c.meta_weight_decay)),
                               optax.sgd(float(c.meta_lr), momentum=float(c.meta_momentum) or None))
        hidden = tuple(int(h) for h in str(c.get("hidden", "10,10")).split(",") if h.strip())
        return dict(multitask_optimizer=base.multitask_optimizer(config, setup), gamma=config.gamma,
                    meta_optimizer=meta_opt, combiner=str(c.get("combiner", "linear")),
                    hidden=hidden, solver=str(c.solver), terms=int(c.terms),
                    alpha=float(config.lr), scale_by_alpha=bool(c.scale_by_alpha),
                    damping=float(c.damping),
                    schedule=base.MetaSchedule(every=int(c.every), sources=("held_out", "train")),
                    held_out_fraction=float(c.held_out_fraction))

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        tasks = base.label_tasks(config, setup, default_tasks(setup))
        multitask, _ = base.networks(config, setup, sum(sum(t.psi) for t in tasks))
        return cls(multitask=multitask, aux_tasks=tasks, **cls.common_fields(config, setup))

    @property
    def num_losses(self) -> int:
        return 1 + len(self.aux_tasks)

    def init_method_state(self, rng, dummy_images):
        combiner = init_combiner(self.combiner, self.num_losses, rng, self.hidden, self.init_upper)
        return {"combiner": combiner, "opt_state": self.meta_optimizer.init({"combiner": combiner})}

    # -------------------------------------------------------------------------- the losses
    def per_example_losses(self, params, batch_stats, batch, aux_targets, axis_name):
        """``(B, 1 + T)`` losses (primary first), new statistics and primary logits."""
        logits, aux_logits, stats = self.forward(params, batch_stats, batch["image"], axis_name,
                                                 batch.get("mask"))
        aux = losses.task_focal_losses(aux_logits, aux_targets, self.aux_sizes, self.gamma)
        return (jnp.concatenate([self.primary_losses(logits, batch["primary"])[:, None], aux], 1),
                stats, logits)

    def phi(self, state, batch, axis_name):
        """The hyperparameters of ``L_T`` on ``batch``, the auxiliary targets they give, and
        anything to carry into the new state (here: the combiner, the data's targets)."""
        return {"combiner": state.method_state["combiner"]}, (lambda phi: self.data_targets(batch)), {}

    def training_loss(self, params, batch_stats, batch, targets, combiner, axis_name):
        per, stats, logits = self.per_example_losses(params, batch_stats, batch, targets, axis_name)
        return combine(combiner, per, axis_name, batch.get("mask")), (stats, logits, per)

    # ---------------------------------------------------------------------------- the steps
    def train_step(self, state, batch, axis_name=None):
        phi, targets_of, carry = self.phi(state, batch, axis_name)
        phi = jax.lax.stop_gradient(phi)
        targets = targets_of(phi)

        def loss_fn(params):
            return self.training_loss(params, state.multitask_batch_stats, batch, targets,
                                      phi["combiner"], axis_name)

        (loss, (stats, logits, per)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.multitask_params)
        new_state, norms = self.update_multitask(
            state, grads, stats, method_state={**state.method_state, **carry})
        mask = batch.get("mask")
        mean = losses.batch_mean(per, axis_name, mask)
        return new_state, {
            "loss": loss, "primary_loss": mean[0], "auxiliary_loss": jnp.mean(mean[1:]),
            "task_losses": mean[1:],
            "combiner_weights": effective_weights(phi["combiner"], per, axis_name, mask),
            "accuracy": losses.accuracy(logits, batch["primary"], axis_name, mask), **norms}

    def hypergradient(self, state, batches, axis_name=None):
        """The implicit hypergradient w.r.t. the learned parameters: ``L_A`` on
        ``batches['held_out']``, ``L_T`` on ``batches['train']``, theta without the auxiliary head.

        Returns ``(grads, result, carry)``: ``grads`` has the structure of the learned parameters,
        ``result`` is the ``meta.MetaGradient``, ``carry`` the state to keep (generator statistics).
        """
        held, batch = batches["held_out"], batches["train"]
        phi, targets_of, carry = self.phi(state, batch, axis_name)
        params = state.multitask_params
        aux_head = params["auxiliary_head"]
        shared = {k: v for k, v in params.items() if k != "auxiliary_head"}
        stats = state.multitask_batch_stats

        def inner_loss(w, hyper):
            loss, (_, _, per) = self.training_loss({**w, "auxiliary_head": aux_head}, stats, batch,
                                                   targets_of(hyper), hyper["combiner"], axis_name)
            return loss, per

        def outer_loss(w, hyper):
            logits, _, _ = self.forward({**w, "auxiliary_head": aux_head}, stats, held["image"],
                                        axis_name, held.get("mask"))
            return losses.batch_mean(self.primary_losses(logits, held["primary"]), axis_name,
                                     held.get("mask")), {}

        result = meta.implicit_gradient(inner_loss, outer_loss, shared, phi, solver=self.solver,
                                        terms=self.terms, alpha=self.alpha,
                                        scale_by_alpha=self.scale_by_alpha, damping=self.damping)
        grads = self.hypergradient_to_params(state, batch, result.grad_hyper, axis_name)
        return grads, result, carry

    def meta_step(self, state, batches, axis_name=None):
        """One update of phi by the meta optimizer along the implicit hypergradient, then the
        combiner's weights clamped at 0."""
        grads, result, carry = self.hypergradient(state, batches, axis_name)
        learned = {k: state.method_state[k] for k in self.learned}
        new, opt_state, norms = steps.apply_update(self.meta_optimizer, learned,
                                                   state.method_state["opt_state"], grads)
        new["combiner"] = clamp_combiner(new["combiner"])
        new_state = state.replace(meta_step=state.meta_step + 1,
                                  method_state={**state.method_state, **carry, **new,
                                                "opt_state": opt_state})
        return new_state, {
            "meta_loss": result.outer_loss, "train_loss": result.inner_loss, **norms,
            "combiner_weights": effective_weights(new["combiner"], result.inner_aux, axis_name,
                                                  batches["train"].get("mask"))}

    def hypergradient_to_params(self, state, batch, grad_hyper, axis_name):
        """The hypergradient w.r.t. the learned parameters (here the combiner itself)."""
        return grad_hyper


# -------------------------------------------------------------------------- the generate variant


@register
class AuxiLearnGenerate(AuxiLearn):
    """AuxiLearn, generate variant: a MAXL-like label generator and a linear combiner, both learned
    by the implicit hypergradient.

    Attributes:
      generator: the label generator (``models.LabelGenerator``, ``sum(psi)`` outputs).
      psi: the hierarchy of the generated labels.
      aux_scale: the auxiliary loss's scale before the combiner (0.25).
    """

    name = "auxilearn_generate"
    config_fields = ("psi", "aux_per_class")
    learned = ("combiner", "generator")

    generator: models.LabelGenerator
    psi: tuple[int, ...] = ()
    aux_scale: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "psi", hierarchy.validate_psi(self.psi, self.num_primary))
        if self.combiner != "linear":
            raise ValueError("auxilearn_generate uses the linear combiner (as the authors')")
        if not (self.multitask.num_auxiliary == self.generator.num_auxiliary == sum(self.psi)):
            raise ValueError(f"the auxiliary head ({self.multitask.num_auxiliary}) and the generator "
                             f"({self.generator.num_auxiliary}) need sum(psi) = {sum(self.psi)} "
                             f"outputs")

    @classmethod
    def defaults(cls) -> dict:
        d = dict(AuxiLearn.defaults())
        d.pop("combiner")
        d.pop("hidden")
        return {**d, "aux_scale": 0.25}

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        psi = base.psi_of(config, setup)
        multitask, generator = base.networks(config, setup, sum(psi))
        fields = cls.common_fields(config, setup)
        fields["combiner"] = "linear"
        return cls(multitask=multitask, generator=generator, psi=psi,
                   aux_scale=float(config[cls.name].aux_scale), **fields)

    @property
    def aux_sizes(self) -> tuple[int, ...]:
        return (sum(self.psi),)

    @property
    def num_losses(self) -> int:
        return 2

    def init_method_state(self, rng, dummy_images):
        c_key, g_key = jax.random.split(rng)
        g_vars = self.generator.init(g_key, dummy_images, False)
        learned = {"combiner": init_combiner("linear", 2, c_key), "generator": g_vars["params"]}
        return {**learned, "generator_batch_stats": g_vars["batch_stats"],
                "opt_state": self.meta_optimizer.init(learned)}

    def _generate(self, state, batch, axis_name, gen_params=None):
        return base.generated_labels(self, state, batch, axis_name, gen_params)

    def phi(self, state, batch, axis_name):
        # phi as seen by L_T: the soft labels of this batch and the combiner (the generator's
        # parameters reach L_T only through the labels; hypergradient_to_params chains them).
        soft, g_stats = self._generate(state, batch, axis_name)
        return ({"combiner": state.method_state["combiner"], "soft": soft},
                lambda phi: phi["soft"], {"generator_batch_stats": g_stats})

    def training_loss(self, params, batch_stats, batch, targets, combiner, axis_name):
        per, stats, logits = self.per_example_losses(params, batch_stats, batch, targets, axis_name)
        per = per.at[:, 1].multiply(self.aux_scale)
        return combine(combiner, per, axis_name, batch.get("mask")), (stats, logits, per)

    def hypergradient_to_params(self, state, batch, grad_hyper, axis_name):
        _, labels_vjp = jax.vjp(lambda g: self._generate(state, batch, axis_name, g)[0],
                                state.method_state["generator"])
        (gen_grad,) = labels_vjp(grad_hyper["soft"])
        return {"combiner": grad_hyper["combiner"], "generator": gen_grad}

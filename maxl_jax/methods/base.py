"""The method interface: what an auxiliary-learning method is to the loop, the CLI and checkpoints.

A method is a frozen dataclass (hashable, so ``jax.jit`` can close over it) holding the multi-task
network, its optimizer and the method's own settings, with pure functions of the ``TrainState``:

* ``init(rng, image_shape) -> TrainState``: the multi-task network plus ``method_state``, the
  method's own learned state (``init_method_state``).
* ``train_step(state, batch, axis_name=None) -> (state, metrics)``: one update of theta1.
* ``meta_step(state, batches, axis_name=None) -> (state, metrics)``: optional; one update of the
  method's learned state. ``batches`` maps each of ``schedule.sources`` to a batch.
* ``eval_step(state, batch, axis_name=None) -> sums``: the primary head on a test batch (shared).

``schedule`` (a ``MetaSchedule``) says when the meta step runs and on what data: after every ``every``
training steps, or as a pass over a fresh shuffle after the epoch's training pass (MAXL's reference
epoch) or before it (``pass_before``: RL-AUX's RL phase); on ``"same"`` (the batch of the training
step just taken), ``"train"`` (another training batch; in a per-epoch pass, the pass's batch),
``"random_train"`` (a batch of an independent shuffle of the training set) or ``"held_out"`` (a batch
of a stratified held-out split of the training set, of ``held_out_fraction``). ``aux_tasks`` lists
the auxiliary labels the data layer must supply in ``batch["aux"]`` (``(B, T)`` int, one column per
task): ``"human"`` (the data set's fine labels) or ``"random"`` (fixed random labels inside each
example's block of ``psi``).

A batch is a dict: ``image`` float ``(B, H, W, C)`` (normalised), ``primary`` int ``(B,)``, when
``aux_tasks`` is not empty ``aux`` int ``(B, T)`` (or ``(B,)`` for one task), and optionally ``mask``
float ``(B,)``: 0 marks padding examples (a batch padded to a multiple of the device count), which
every mean, BatchNorm statistic and metric then ignores.

Each method is one module of ``maxl_jax.methods`` with a class decorated ``@register``; it builds
itself from the run's config with ``from_config(config, setup)`` and declares its own config fields
with ``defaults()`` (they appear as ``--config.<name>.<field>``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from maxl_jax import hierarchy, losses, maxl, models, steps, validation
from maxl_jax.train_state import TrainState

PyTree = Any
Batch = Mapping[str, jax.Array]

SOURCES = ("same", "train", "random_train", "held_out")
LABEL_SOURCES = ("human", "random")


@dataclasses.dataclass(frozen=True)
class MetaSchedule:
    """When a method's meta step runs and which batches it takes.

    Attributes:
      every: one meta step after every ``every`` training steps (0: none interleaved).
      per_epoch_pass: after the epoch's training pass, one meta step per training batch over a
        fresh shuffle of the training set (the MAXL reference's pass B); its first source must be
        ``"train"``.
      pass_before: with ``per_epoch_pass``, the meta pass runs before the epoch's training pass
        instead of after it (RL-AUX's RL phase, then its primary phase).
      sources: the batches each meta step receives, by name (``"same"``, ``"train"``,
        ``"random_train"``, ``"held_out"``), in the order the method wants them.
    """

    every: int = 0
    per_epoch_pass: bool = False
    sources: tuple[str, ...] = ()
    pass_before: bool = False

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"MetaSchedule.every must be an integer >= 0, got {self.every!r}")
        for s in self.sources:
            if s not in SOURCES:
                raise ValueError(f"unknown meta-step data source {s!r}; choose from {SOURCES}")
        if self.has_meta and not self.sources:
            raise ValueError("a schedule with meta steps needs at least one data source")
        if self.per_epoch_pass and self.sources[0] != "train":
            raise ValueError("a per-epoch meta pass runs over the training set: its first source "
                             "must be 'train'")
        if self.per_epoch_pass and "same" in self.sources:
            raise ValueError("a per-epoch meta pass has no 'same' batch (it runs as a pass of its "
                             "own, apart from the training steps)")
        if self.pass_before and not self.per_epoch_pass:
            raise ValueError("pass_before places the per-epoch meta pass before the training pass: "
                             "it needs per_epoch_pass=True")

    @property
    def has_meta(self) -> bool:
        return self.every > 0 or self.per_epoch_pass

    def events(self, steps_per_epoch: int) -> list[tuple[str, int]]:
        """The epoch's steps in order: ``("train", i)`` and ``("meta", j)`` with per-kind indices."""
        out, j = [], 0
        if self.pass_before:
            out.extend(("meta", k) for k in range(steps_per_epoch))
            j = steps_per_epoch
        for i in range(steps_per_epoch):
            out.append(("train", i))
            if self.every and (i + 1) % self.every == 0:
                out.append(("meta", j))
                j += 1
        if self.per_epoch_pass and not self.pass_before:
            out.extend(("meta", j + k) for k in range(steps_per_epoch))
        return out

    def meta_steps_per_epoch(self, steps_per_epoch: int) -> int:
        return sum(kind == "meta" for kind, _ in self.events(steps_per_epoch))


class AuxTask(NamedTuple):
    """An auxiliary task whose labels the data layer supplies: its source and its hierarchy ``psi``
    (``psi[i]`` classes belong to primary class ``i``; the task has ``sum(psi)`` classes)."""

    source: str
    psi: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the data set and the run tell a method when it is built from a config."""

    num_primary: int
    psi_human: tuple[int, ...] | None
    steps_per_epoch: int
    dataset: str = ""


def implicit_estimator_mode(fields) -> str:
    """How a method's ``solver``, ``terms``, ``damping`` and ``scale_by_alpha`` fields set its
    implicit hypergradient (``meta.implicit_gradient``), for ``mode_of``; "(the authors')" marks
    AuxiLearn's and MAOAL's Neumann J = 3 without the leading alpha, undamped."""
    solver, terms, damping = str(fields.solver), int(fields.terms), float(fields.damping)
    form = (f"Neumann J = {terms}" + ("" if fields.scale_by_alpha else
                                      ", without the leading alpha")
            if solver == "neumann" else f"CG, {terms} iterations")
    form += f", damping {damping:g}" if damping else ", undamped"
    authors = solver == "neumann" and terms == 3 and not damping and not fields.scale_by_alpha
    return form + (" (the authors')" if authors else "")


# ---------------------------------------------------------------------------------- the base class


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """The interface every method implements, with the parts most methods share.

    Attributes:
      multitask: the multi-task network f(theta1) (``models.MultiTaskNet``).
      multitask_optimizer: optax transformation for theta1.
      aux_tasks: the auxiliary tasks whose labels come with the data (``batch["aux"]``).
      gamma: focal-loss exponent of every loss.
      schedule: when the meta step runs and on what data.
      held_out_fraction: the stratified fraction of the training set held out for the meta step
        (needed when ``"held_out"`` is a source).
    """

    name: ClassVar[str] = ""
    #: Metrics of each kind of step the loop checks for finiteness after every step.
    train_checked: ClassVar[tuple[str, ...]] = ("loss", "primary_loss", "grad_norm", "update_norm",
                                                "param_norm")
    meta_checked: ClassVar[tuple[str, ...]] = ("meta_loss", "grad_norm", "update_norm")
    #: Meta-step metrics for the epoch line and the learning-curve plot: (key, label).
    report: ClassVar[tuple[tuple[str, str], ...]] = (("meta_loss", "meta loss"),)
    #: Training-step metrics (epoch means; scalars or one value per task) for the epoch line.
    train_report: ClassVar[tuple[tuple[str, str], ...]] = ()

    multitask: models.MultiTaskNet
    multitask_optimizer: optax.GradientTransformation
    aux_tasks: tuple[AuxTask, ...] = ()
    gamma: float = 2.0
    schedule: MetaSchedule = MetaSchedule()
    held_out_fraction: float = 0.0

    def __post_init__(self):
        for task in self.aux_tasks:
            if task.source not in LABEL_SOURCES:
                raise ValueError(f"unknown auxiliary label source {task.source!r}; choose from "
                                 f"{LABEL_SOURCES}")
            hierarchy.validate_psi(task.psi, self.multitask.num_primary)
        if self.aux_tasks and self.multitask.num_auxiliary != sum(self.aux_sizes):
            raise ValueError(
                f"the auxiliary head has {self.multitask.num_auxiliary} outputs but the auxiliary "
                f"tasks have {list(self.aux_sizes)} classes: build the network with "
                f"num_auxiliary={sum(self.aux_sizes)}")
        scale = getattr(self.multitask.backbone, "loss_scale", 1.0)
        if scale != 1 and self.schedule.has_meta:
            raise ValueError(
                f"method {self.name!r} takes a meta step, whose derivatives of second order a loss "
                f"scale inside the networks would distort (see maxl_jax/precision.py): run it with "
                f"--config.loss_scale=1, or in bfloat16 (float32's range, no scaling needed)")
        if "held_out" in self.schedule.sources and not 0 < self.held_out_fraction < 1:
            raise ValueError(f"a meta step on held-out data needs 0 < held_out_fraction < 1, got "
                             f"{self.held_out_fraction}")

    # ------------------------------------------------------------------ building from a config
    @classmethod
    def defaults(cls) -> dict:
        """The method's own config fields and their defaults (``--config.<name>.<field>``)."""
        return {}

    @classmethod
    def mode_of(cls, config) -> dict[str, str]:
        """Which behaviour a run under ``config`` follows where the paper, the authors' code and
        ours differ: ``{choice: "value (whose)"}``, recorded in ``summary.json`` as ``mode`` so a
        table can say what it measured. Every method has its loss; methods add their own."""
        gamma = float(config.get("gamma", 2.0))
        return {"loss": "cross-entropy (gamma 0)" if gamma == 0 else f"focal, gamma {gamma:g}"}

    #: Shared (top-level) config fields the method reads, besides the ones every method reads.
    config_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def validate_config(cls, config) -> None:
        """Checks the method's own config fields against the types of ``defaults()`` (raises
        ``validation.ConfigError``); methods add their ranges by overriding ``check_fields``."""
        own = cls.defaults()
        if not own:
            return
        sub = config.get(cls.name) if cls.name in config else None
        if sub is None:
            raise validation.ConfigError(f"the config has no section {cls.name!r} for the method's "
                                         f"settings {sorted(own)}")
        for key, default in own.items():
            value = sub.get(key)
            where = f"--config.{cls.name}.{key}={value!r}"
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise validation.ConfigError(f"{where} is not True or False")
            elif isinstance(default, (int, float)):
                validation.check_range(key, value, "int" if isinstance(default, int) else "float",
                                       None, prefix=f"{cls.name}.")
            elif isinstance(default, str) and not isinstance(value, str):
                raise validation.ConfigError(f"{where} is not a string")
        cls.check_fields(sub)

    @classmethod
    def check_fields(cls, fields) -> None:
        """Ranges of the method's own fields (``--config.<name>.*``); none by default."""

    @classmethod
    def held_out_fraction_of(cls, config) -> float:
        """The held-out fraction this method asks of the data layer under ``config``."""
        return 0.0

    @classmethod
    def from_config(cls, config, setup: Setup) -> "Method":
        raise NotImplementedError(f"method {cls.name!r} cannot be built from a config")

    # ---------------------------------------------------------------------------- properties
    @property
    def num_primary(self) -> int:
        return self.multitask.num_primary

    @property
    def aux_sizes(self) -> tuple[int, ...]:
        return tuple(sum(t.psi) for t in self.aux_tasks)

    @property
    def has_meta(self) -> bool:
        return self.schedule.has_meta

    # -------------------------------------------------------------------------------- init
    def init(self, rng: jax.Array, image_shape: Sequence[int]) -> TrainState:
        """A fresh state for images of shape ``(H, W, C)``, from the key ``rng``.

        Compiled as one XLA program (op-by-op initialisation compiles every small op separately).
        """
        return jax.jit(self._init, static_argnums=1)(rng, tuple(image_shape))

    def _init(self, rng: jax.Array, image_shape: tuple[int, ...]) -> TrainState:
        f_key, m_key, run_key = jax.random.split(rng, 3)
        dummy = jnp.zeros((2, *image_shape), jnp.float32)
        f_vars = self.multitask.init(f_key, dummy, False)
        return TrainState(
            step=jnp.zeros((), jnp.int32), meta_step=jnp.zeros((), jnp.int32),
            multitask_params=f_vars["params"], multitask_batch_stats=f_vars["batch_stats"],
            multitask_opt_state=self.multitask_optimizer.init(f_vars["params"]),
            method_state=self.init_method_state(m_key, dummy), rng=run_key)

    def init_method_state(self, rng: jax.Array, dummy_images: jax.Array) -> PyTree:
        """The method's own learned state (``{}``: none)."""
        return {}

    # ------------------------------------------------------------------------------- steps
    def train_step(self, state: TrainState, batch: Batch,
                   axis_name: str | None = None) -> tuple[TrainState, dict]:
        raise NotImplementedError

    def meta_step(self, state: TrainState, batches: Mapping[str, Batch],
                  axis_name: str | None = None) -> tuple[TrainState, dict]:
        raise ValueError(f"method {self.name!r} has no meta step")

    def eval_step(self, state: TrainState, batch: Batch, axis_name: str | None = None) -> dict:
        """Primary-head sums on a test batch with BatchNorm running statistics.

        Returns ``correct``, ``loss_sum`` and ``count`` (sums, so batches of any size add up);
        examples with ``batch['mask'] == 0`` (padding) are left out.
        """
        primary_logits, _ = self.multitask.apply(state.multitask_variables, batch["image"], False)
        mask = batch.get("mask", jnp.ones(batch["primary"].shape, jnp.float32))
        one_hot = jax.nn.one_hot(batch["primary"], primary_logits.shape[-1])
        per_example = losses.focal_loss_per_example(
            jax.nn.log_softmax(primary_logits, -1), one_hot, self.gamma)
        correct = (jnp.argmax(primary_logits, -1) == batch["primary"]).astype(jnp.float32)
        sums = {"correct": jnp.sum(correct * mask), "loss_sum": jnp.sum(per_example * mask),
                "count": jnp.sum(mask)}
        return sums if axis_name is None else jax.lax.psum(sums, axis_name)

    def epoch_summary(self, means: Mapping[str, Mapping[str, Any]]) -> dict:
        """Extra entries for the epoch's record, from its metrics (``means['train' | 'meta']``,
        sums for keys ending in ``_sum`` or ``_count``). Default: none."""
        return {}

    # ---------------------------------------------------------------- helpers for subclasses
    def data_targets(self, batch: Batch, dtype=jnp.float32) -> jax.Array:
        """One-hot targets ``(B, sum(aux_sizes))`` of the data-supplied auxiliary labels."""
        aux = batch["aux"]
        aux = aux[:, None] if aux.ndim == 1 else aux
        return jnp.concatenate([jax.nn.one_hot(aux[:, t], k, dtype=dtype)
                                for t, k in enumerate(self.aux_sizes)], axis=-1)

    def forward(self, params: PyTree, batch_stats: PyTree, images: jax.Array,
                axis_name: str | None = None, mask: jax.Array | None = None):
        """f in train mode (batch statistics): ``(primary_logits, aux_logits, new_batch_stats)``."""
        (primary_logits, aux_logits), updated = self.multitask.apply(
            {"params": params, "batch_stats": batch_stats}, images, True, axis_name, mask,
            mutable=["batch_stats"])
        return primary_logits, aux_logits, updated["batch_stats"]

    def primary_losses(self, primary_logits: jax.Array, primary: jax.Array) -> jax.Array:
        """Per-example primary focal losses ``(B,)``."""
        one_hot = jax.nn.one_hot(primary, primary_logits.shape[-1], dtype=primary_logits.dtype)
        return losses.focal_loss_per_example(jax.nn.log_softmax(primary_logits, -1), one_hot,
                                             self.gamma)

    def task_gradients(self, params: PyTree, batch_stats: PyTree, batch: Batch,
                       axis_name: str | None = None, targets: jax.Array | None = None):
        """Each task's loss and gradient separately, from one forward pass.

        Returns ``(task_losses (1 + T,), grads, new_batch_stats, primary_logits)``: entry 0 is the
        primary task, entries 1.. the auxiliary tasks of ``aux_tasks``; every leaf of ``grads`` has
        a leading axis of ``1 + T`` (one reverse pass per task, batched with ``vmap``).
        """
        if targets is None:  # the data's labels (a method with learned targets passes its own)
            targets = self.data_targets(batch)
        mask = batch.get("mask")

        def task_losses(p):
            logits, aux_logits, stats = self.forward(p, batch_stats, batch["image"], axis_name,
                                                     mask)
            primary = losses.batch_mean(self.primary_losses(logits, batch["primary"]), axis_name,
                                        mask)
            aux = losses.batch_mean(losses.task_focal_losses(aux_logits, targets, self.aux_sizes,
                                                             self.gamma), axis_name, mask)
            return jnp.concatenate([primary[None], aux]), (stats, logits)

        values, vjp, (stats, logits) = jax.vjp(task_losses, params, has_aux=True)
        grads = jax.vmap(lambda c: vjp(c)[0])(jnp.eye(values.shape[0], dtype=values.dtype))
        return values, grads, stats, logits

    def update_multitask(self, state: TrainState, grads: PyTree, batch_stats: PyTree,
                         **replace) -> tuple[TrainState, dict]:
        """Applies ``grads`` to theta1 with the multi-task optimizer; counts one training step."""
        params, opt_state, norms = steps.apply_update(self.multitask_optimizer,
                                                      state.multitask_params,
                                                      state.multitask_opt_state, grads)
        new_state = state.replace(step=state.step + 1, multitask_params=params,
                                  multitask_batch_stats=batch_stats, multitask_opt_state=opt_state,
                                  **replace)
        return new_state, norms


def shared_dots(grads: PyTree) -> jax.Array:
    """``(1 + T, 1 + T)`` inner products of the task gradients ``grads`` (leading axis: tasks) over
    the multi-task network's shared parameters (its backbone; the heads are task-specific)."""
    leaves = [g.reshape(g.shape[0], -1) for g in jax.tree_util.tree_leaves(grads["backbone"])]
    flat = jnp.concatenate(leaves, axis=1)
    return flat @ flat.T


def combine_task_gradients(grads: PyTree, shared_weights: jax.Array,
                           head_weights: jax.Array) -> PyTree:
    """``sum_t weight_t grad_t``: with ``shared_weights (1 + T,)`` on the backbone and
    ``head_weights (1 + T,)`` on the heads."""
    def combine(path, g):
        w = shared_weights if path[0].key == "backbone" else head_weights
        return jnp.tensordot(w.astype(g.dtype), g, axes=1)
    return jax.tree_util.tree_map_with_path(combine, grads)


# ----------------------------------------------------------------- building blocks of from_config


def psi_of(config, setup: Setup) -> tuple[int, ...]:
    """The run's hierarchy for generated or random labels: ``config.psi``, or ``aux_per_class``
    auxiliary classes for each primary class."""
    if config.get("psi"):
        return hierarchy.validate_psi(list(config.psi), setup.num_primary)
    return (int(config.aux_per_class),) * setup.num_primary


def label_tasks(config, setup: Setup, default: Sequence[str]) -> tuple[AuxTask, ...]:
    """The data-supplied auxiliary tasks of ``config.aux_tasks`` (comma-separated sources, e.g.
    ``"human,random"``; empty: ``default``)."""
    names = [s.strip() for s in str(config.get("aux_tasks") or "").split(",") if s.strip()]
    names = names or list(default)
    tasks = []
    for name in names:
        if name == "human":
            if setup.psi_human is None:
                raise ValueError(
                    f"the 'human' auxiliary task needs a data set with fine labels (cifar100, "
                    f"fashion_mnist_coarse); {setup.dataset!r} has none: use "
                    f"--config.aux_tasks=random or another --config.dataset")
            tasks.append(AuxTask("human", tuple(setup.psi_human)))
        elif name == "random":
            tasks.append(AuxTask("random", psi_of(config, setup)))
        else:
            raise ValueError(f"unknown auxiliary task {name!r} in --config.aux_tasks="
                             f"{config.get('aux_tasks')!r}; choose from {LABEL_SOURCES}, "
                             f"comma-separated")
    return tuple(tasks)


def networks(config, setup: Setup, num_auxiliary: int, generator_classes: int | None = None,
             generator_weight_head: bool = False):
    """``(multitask, generator)`` of the config's architecture (``models.make_networks``), computing
    in the config's ``dtype`` with its ``loss_scale`` (``maxl_jax.precision``): every method that
    builds its networks here runs in the run's precision, with float32 parameters, optimizer states,
    losses and meta-gradients."""
    return models.make_networks(
        config.arch, setup.num_primary, num_auxiliary, generator_classes or num_auxiliary,
        conv_impl=config.conv_impl, width=config.get("width") or None,
        head_width=config.get("head_width") or None, generator_weight_head=generator_weight_head,
        dtype=config.get("dtype") or "float32", loss_scale=config.get("loss_scale") or None,
        image_shape=image_shape_of(setup.dataset))


def image_shape_of(dataset: str) -> tuple[int, int, int]:
    """The images' ``(H, W, C)`` of a data set by its name: 32x32x3 for CIFAR, 28x28x1 for the
    others (Fashion-MNIST, EMNIST). A backbone of your own is probed at this shape for its feature
    width (``models.make_networks``)."""
    return (32, 32, 3) if str(dataset).startswith("cifar") or not dataset else (28, 28, 1)


def multitask_optimizer(config, setup: Setup) -> optax.GradientTransformation:
    """The reference's theta1 optimizer: SGD(``lr``), halved every ``decay_every`` epochs."""
    return optax.sgd(steps.step_lr_schedule(config.lr, setup.steps_per_epoch, config.decay_every))


def generated_labels(method, state: TrainState, batch: Batch, axis_name: str | None = None,
                     generator_params: PyTree | None = None):
    """``(soft_labels, new_generator_batch_stats)`` of a method whose ``method_state`` holds a MAXL
    label generator as ``generator`` (parameters) and ``generator_batch_stats``, in train mode;
    ``generator_params`` replaces the state's (to differentiate through the labels)."""
    params = state.method_state["generator"] if generator_params is None else generator_params
    return maxl.generate_labels(
        method.generator, {"params": params,
                           "batch_stats": state.method_state["generator_batch_stats"]},
        batch["image"], batch["primary"], method.psi, train=True, axis_name=axis_name,
        mask=batch.get("mask"))

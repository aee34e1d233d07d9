"""Pure train and eval steps ``(state, batch) -> (state, metrics)`` for MAXL and its baselines.

Methods (the reference's four scripts):

* ``single``: primary task only.
* ``human``: the auxiliary head learns the true fine labels (one-hot), e.g. CIFAR-100's 100 classes.
* ``random``: the auxiliary head learns fixed random labels drawn inside each example's block of psi.
* ``maxl``: the auxiliary head learns the generator's soft labels; the generator is trained by the
  meta step (``theta2_step``).

A batch is a dict: ``image`` float ``(B, H, W, C)`` (already normalised), ``primary`` int ``(B,)`` and,
for ``human``/``random``, ``aux`` int ``(B,)``. All steps take ``axis_name`` for ``shard_map`` use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from maxl_jax import hierarchy, losses, maxl, models
from maxl_jax.train_state import TrainState

PyTree = Any
METHODS = ("single", "human", "random", "maxl")


def step_lr_schedule(base_lr: float, steps_per_epoch: int, every: int = 50, factor: float = 0.5,
                     offset: int = 1) -> optax.Schedule:
    """The reference's StepLR(every, factor) as an optax schedule of the update count.

    The reference calls ``scheduler.step()`` at the start of each epoch, so the rate of 0-based epoch
    ``e`` is ``base * factor ** ((e + offset) // every)`` with ``offset = 1``: halved from epochs
    49, 99, 149 on (its inner step size follows the same rule).
    """
    def schedule(count):
        epoch = count // steps_per_epoch
        return base_lr * factor ** ((epoch + offset) // every)
    return schedule


def global_norm(tree: PyTree) -> jax.Array:
    """Euclidean norm of all leaves of ``tree`` together (0 for an empty tree)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum((jnp.sum(jnp.square(x)) for x in leaves), jnp.zeros((), jnp.float32)))


@dataclasses.dataclass(frozen=True)
class Maxl:
    """The static description of a run: networks, hierarchy, method, optimizers, hyperparameters.

    Hashable (frozen, compared by identity of its optimizers), so it can be closed over by ``jax.jit``.

    Attributes:
      multitask / generator: Flax modules (``models.make_networks``).
      psi: hierarchy of the generated (``maxl``) or random auxiliary labels; for ``human`` the
        hierarchy of the true fine labels.
      multitask_optimizer / generator_optimizer: optax transformations for theta1 and theta2.
      inner_lr: schedule of the inner step size alpha, a function of ``meta_step``.
      inner_optimizer: ``lr -> GradientTransformation`` used for theta1+ (default plain SGD).
      inner_steps, entropy_weight, aux_weight, gamma: as in ``maxl.meta_gradient``.
      meta_form: ``"reverse"`` or ``"forward_over_reverse"``.
    """

    multitask: models.MultiTaskNet
    generator: models.LabelGenerator
    psi: Sequence[int]
    method: str
    multitask_optimizer: optax.GradientTransformation
    generator_optimizer: optax.GradientTransformation
    inner_lr: Callable[[jax.Array], jax.Array] = lambda count: 0.01
    inner_optimizer: Callable[[Any], optax.GradientTransformation] = optax.sgd
    inner_steps: int = 1
    entropy_weight: float = 0.2
    aux_weight: float = 1.0
    gamma: float = 2.0
    meta_form: str = "reverse"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        object.__setattr__(self, "psi", hierarchy.validate_psi(self.psi, self.multitask.num_primary))
        if self.method != "single" and self.multitask.num_auxiliary != sum(self.psi):
            raise ValueError(
                f"the auxiliary head has {self.multitask.num_auxiliary} classes but sum(psi) = "
                f"{sum(self.psi)}: build the networks with num_auxiliary=sum(psi)")
        if self.method == "maxl" and self.generator.num_auxiliary != sum(self.psi):
            raise ValueError(f"the label generator has {self.generator.num_auxiliary} outputs but "
                             f"sum(psi) = {sum(self.psi)}")

    @property
    def has_generator(self) -> bool:
        return self.method == "maxl"

    # ------------------------------------------------------------------ init
    def init(self, rng: jax.Array, image_shape: Sequence[int]) -> TrainState:
        """A fresh state for images of shape ``(H, W, C)``, from the key ``rng``.

        Compiled as one XLA program (op-by-op initialisation compiles every small op separately).
        """
        return jax.jit(self._init, static_argnums=1)(rng, tuple(image_shape))

    def _init(self, rng: jax.Array, image_shape: tuple[int, ...]) -> TrainState:
        f_key, g_key, run_key = jax.random.split(rng, 3)
        dummy = jnp.zeros((2, *image_shape), jnp.float32)
        f_vars = self.multitask.init(f_key, dummy, False)
        f_params, f_stats = f_vars["params"], f_vars["batch_stats"]
        g_params, g_stats, g_opt = {}, {}, {}
        if self.has_generator:
            g_vars = self.generator.init(g_key, dummy, False)
            g_params, g_stats = g_vars["params"], g_vars["batch_stats"]
            g_opt = self.generator_optimizer.init(g_params)
        return TrainState(
            step=jnp.zeros((), jnp.int32), meta_step=jnp.zeros((), jnp.int32),
            multitask_params=f_params, multitask_batch_stats=f_stats,
            multitask_opt_state=self.multitask_optimizer.init(f_params),
            generator_params=g_params, generator_batch_stats=g_stats, generator_opt_state=g_opt,
            rng=run_key)

    # ---------------------------------------------------------- theta1 step
    def auxiliary_targets(self, state: TrainState, batch: dict, axis_name: str | None = None):
        """Auxiliary targets ``(B, K)`` of the method (constants for theta1), new generator
        statistics, and label statistics (``maxl`` only)."""
        if self.method == "single":
            return None, state.generator_batch_stats, {}
        if self.method in ("human", "random"):
            return (jax.nn.one_hot(batch["aux"], sum(self.psi), dtype=jnp.float32),
                    state.generator_batch_stats, {})
        soft, g_stats = maxl.generate_labels(self.generator, state.generator_variables,
                                             batch["image"], batch["primary"], self.psi,
                                             train=True, axis_name=axis_name)
        soft = jax.lax.stop_gradient(soft)
        return soft, g_stats, maxl.label_statistics(soft, batch["primary"], self.psi, axis_name)

    def theta1_step(self, state: TrainState, batch: dict,
                    axis_name: str | None = None) -> tuple[TrainState, dict]:
        """One update of the multi-task network on ``L_pri + aux_weight * L_aux`` (pass A)."""
        targets, g_stats, label_stats = self.auxiliary_targets(state, batch, axis_name)

        def loss_fn(params):
            return maxl.multitask_loss(self.multitask, params, state.multitask_batch_stats,
                                       batch["image"], batch["primary"], targets,
                                       aux_weight=self.aux_weight, gamma=self.gamma,
                                       axis_name=axis_name)

        (loss, (f_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.multitask_params)
        updates, opt_state = self.multitask_optimizer.update(grads, state.multitask_opt_state,
                                                             state.multitask_params)
        params = optax.apply_updates(state.multitask_params, updates)
        metrics = {
            "loss": loss, "primary_loss": parts["primary"], "auxiliary_loss": parts["auxiliary"],
            "accuracy": maxl.accuracy(parts["primary_logits"], batch["primary"], axis_name),
            "grad_norm": global_norm(grads), "update_norm": global_norm(updates),
            "param_norm": global_norm(params), **label_stats,
        }
        new_state = state.replace(step=state.step + 1, multitask_params=params,
                                  multitask_batch_stats=f_stats, multitask_opt_state=opt_state,
                                  generator_batch_stats=g_stats)
        return new_state, metrics

    # ---------------------------------------------------------- theta2 step
    def theta2_step(self, state: TrainState, batch: dict,
                    axis_name: str | None = None) -> tuple[TrainState, dict]:
        """One meta update of the label generator (pass B), exact second order."""
        if not self.has_generator:
            raise ValueError(f"method {self.method!r} has no label generator to meta-train")
        alpha = self.inner_lr(state.meta_step)
        result = maxl.meta_gradient(
            self.multitask, self.generator, state.multitask_variables, state.generator_variables,
            batch["image"], batch["primary"], self.psi,
            inner_optimizer=self.inner_optimizer(alpha), inner_steps=self.inner_steps,
            entropy_weight=self.entropy_weight, aux_weight=self.aux_weight, gamma=self.gamma,
            form=self.meta_form, axis_name=axis_name)
        updates, opt_state = self.generator_optimizer.update(result.grad, state.generator_opt_state,
                                                             state.generator_params)
        params = optax.apply_updates(state.generator_params, updates)
        metrics = {
            "meta_loss": result.meta_loss, **result.metrics, "inner_lr": jnp.asarray(alpha),
            "grad_norm": global_norm(result.grad), "update_norm": global_norm(updates),
            "param_norm": global_norm(params),
            **maxl.label_statistics(result.soft_labels, batch["primary"], self.psi, axis_name),
        }
        new_state = state.replace(meta_step=state.meta_step + 1, generator_params=params,
                                  generator_opt_state=opt_state,
                                  generator_batch_stats=result.generator_batch_stats,
                                  multitask_batch_stats=result.multitask_batch_stats)
        return new_state, metrics

    # ------------------------------------------------------------ eval step
    def eval_step(self, state: TrainState, batch: dict, axis_name: str | None = None) -> dict:
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


def reference_optimizers(steps_per_epoch: int, lr: float = 0.01, generator_lr: float = 1e-3,
                         weight_decay: float = 5e-4, decay_every: int = 50):
    """The reference's optimizers: SGD(lr) for theta1; SGD(generator_lr) with L2 weight decay added to
    the gradient for theta2; both halved every ``decay_every`` epochs; the inner alpha schedule
    (0.01, halved on the same epochs, counted in meta steps). Returns ``(f_opt, g_opt, inner_lr)``."""
    f_opt = optax.sgd(step_lr_schedule(lr, steps_per_epoch, decay_every))
    g_opt = optax.chain(optax.add_decayed_weights(weight_decay),
                        optax.sgd(step_lr_schedule(generator_lr, steps_per_epoch, decay_every)))
    return f_opt, g_opt, step_lr_schedule(lr, steps_per_epoch, decay_every)

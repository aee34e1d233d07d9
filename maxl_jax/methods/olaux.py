"""OL-AUX: online learning of auxiliary task weights (Lin, Baweja, Kantor & Held, "Adaptive
Auxiliary Task Weighting for Reinforcement Learning", NeurIPS 2019; authors' code
``Xingyu-Lin/auxiliary-tasks-rl``, ``olaux/ddpg.py`` with the defaults of ``olaux/main.py``).

The training loss is ``L_pri + sum_k w_k L_aux_k``. The weights follow the gradient of the primary
loss after the next updates: to first order in the step size ``alpha``,
``d/dw_k L_pri(theta - alpha (g_0 + sum_j w_j g_j)) = -alpha <g_0, g_k>`` (``g_0 = grad L_pri``,
``g_k = grad L_aux_k``), so every ``every`` (N) training steps

    w_k <- max(0, w_k + beta * alpha * mean_{last N steps} <g_0, g_k>)

with the products over the shared parameters (the backbone: the heads' products are zero, each head
serving one side) and ``alpha`` the multi-task network's current learning rate. Each step takes one
reverse pass per task; the products accumulate in the method's state, so the weight update needs no
extra data and no meta step.

Defaults (the paper leaves them to the environment; these are ours, written here): ``N = 5``,
``beta = 1``, initial weights ``aux_weight`` (1). The auxiliary labels come with the data
(``--config.aux_tasks``, like ``equal``).

The authors' code, and the options that reproduce it (``--config.olaux.*``; line numbers of the
repository at commit ``0146d2e``, the code of its release ``0de354b`` unchanged):

* ``reduce``: ``"mean"`` (ours, above) or ``"sum"``: the N products summed instead of averaged.
  Theirs sums: the step is ``aux_weights_lr * mean`` with ``aux_weights_lr = aux_base_lr *
  aux_update_interval`` (``ddpg.py`` lines 88, 277-279), i.e. ``aux_base_lr * sum``, the sum of
  their quadratic example too (``quadratic.py`` line 82). Their ``aux_base_lr = 5`` (``main.py``
  line 63) is ``beta = 5`` with ``reduce="sum"``, or ``beta = 5 N = 25`` with ``"mean"``.
* ``smooth``: K >= 1 (ours: 1, none). Theirs (``aux_filter_interval = 4``, ``main.py`` line 64;
  ``ddpg.py`` lines 94-95, 268-271) averages the *gradients* of the last K steps, the main one and
  each auxiliary one separately, and takes the product of the averages,
  ``<mean_{last K} g_main, mean_{last K} g_k>`` (not the mean of the K products), at every step;
  the history runs across the weight updates (never cleared), and over the first K - 1 steps holds
  fewer than K. Ours keeps the last K steps' backbone gradients (the main one as it was used at
  its step, with that step's weights) in a ring buffer in the method's state, indexed by the
  training step: ``K (1 + T)`` backbone-sized arrays more in the state and its checkpoints.
* ``log_losses``: train on, and take the gradients of, the log-losses (ours: off). Theirs
  (``log_loss = 1``, ``main.py`` line 66) trains ``log L_main + sum_k w_k log(L_k + c)`` with
  ``c = log_min_loss = 0.02`` (``main.py`` line 67; ``ddpg.py`` lines 363-366, 372-379), and the
  auxiliary gradients of the products are those of ``log(L_k + c)`` (``ddpg.py`` lines 402-404).
  Their main loss enters as ``log L`` with no offset (the critic, line 365; the actor's loss is
  first clipped at float64's epsilon, line 364): ours takes ``log max(L_pri, 2.2e-16)``. The log
  is applied to the primary and auxiliary losses alike, so every gradient is its task's divided by
  its loss (``grad log L = grad L / L``). Theirs trains with Adam, which a loss's scale does not
  change much; with our SGD the log multiplies the primary's effective step size by ``1 / L_pri``.
  ``log_min_loss``: ``c`` (0.02, theirs); read only with ``log_losses``.
* ``main_gradient``: ``"primary"`` (ours: ``g_0``, the first-order derivative above) or
  ``"total"``: ``g_0 + sum_j w_j g_j``, the gradient of the whole weighted training loss. Theirs
  dots the auxiliary gradients with ``tf.gradients(self.Q_loss_tf, ...)`` (``ddpg.py`` lines
  412-414) after the weighted auxiliary losses were added to ``Q_loss_tf`` (lines 372-384): the
  total. (Their quadratic example, ``quadratic.py`` lines 75-79, dots ``g_0`` with ``w_k g_k``
  instead; ``ddpg.py`` is what their experiments ran.)
* ``authors``: ``True`` sets all four to theirs and ``beta`` to 5: ``reduce="sum"``, ``smooth=4``,
  ``log_losses=True``, ``main_gradient="total"``, ``beta=5``, keeping ``every`` (5, theirs,
  ``main.py`` line 62) and ``log_min_loss`` (0.02, theirs) as given. With it, those five fields
  must stay at their defaults (a ``ConfigError`` names one that does not): to vary one of them,
  leave ``authors`` off and give every field.

Where theirs is ours already: the weights start at 1 (``ddpg.py`` line 90; ours ``aux_weight``, 1),
an update clips them at 0 (``mpi_aux_update.py`` line 39), every product is multiplied by the
network's learning rate (``Q_lr``, ``ddpg.py`` line 274; ours ``lr(step)`` at the update, the same
for a constant rate), and the products are over the shared encoder only (``main/Q/cnn``, lines
403-414; ours the backbone). Not reproduced: their MPI averaging of the gradients over 8 workers
before the products (``mpi_aux_update.py`` lines 27-36; ours, the gradients of the whole batch, over
every device), their gradient clipping (``clip_grad_range``, off by default), and the RL setting.
``mode`` in ``summary.json`` says which of these a run used.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxl_jax import losses, steps, validation
from maxl_jax.methods import base
from maxl_jax.methods import register
from maxl_jax.methods.equal import default_tasks

REDUCTIONS = ("mean", "sum")
MAIN_GRADIENTS = ("primary", "total")
#: What ``--config.olaux.authors=True`` sets (the authors' ``olaux/main.py`` defaults).
AUTHORS = {"beta": 5.0, "reduce": "sum", "smooth": 4, "log_losses": True, "main_gradient": "total"}
#: Our values of the same fields (the defaults).
OURS = {"beta": 1.0, "reduce": "mean", "smooth": 1, "log_losses": False, "main_gradient": "primary"}
#: The primary loss's floor before its log (the authors' clip of their actor loss: float64's eps).
LOG_FLOOR = float(np.finfo(np.float64).eps)


@register
class OlAux(base.Method):
    """Auxiliary weights moved online by the alignment of auxiliary and primary gradients.

    Attributes:
      initial_weights: ``(T,)`` starting weights.
      every: N, training steps between weight updates.
      beta: the weights' step size (multiplied by the current learning rate ``lr(step)``).
      lr: the multi-task network's learning-rate schedule, a function of its step count.
      reduce: ``"mean"`` or ``"sum"`` of the N products in a weight step.
      smooth: K, the products taken between the mean gradients of the last K steps (1: this step's).
      log_losses: train on ``log L_pri + sum_k w_k log(L_k + log_min_loss)``, and take the products
        of those terms' gradients.
      log_min_loss: the auxiliary losses' offset before the log.
      main_gradient: ``"primary"`` (``g_0``) or ``"total"`` (``g_0 + sum_j w_j g_j``), the main
        gradient of the products.
    """

    name = "olaux"
    config_fields = ("aux_tasks", "psi", "aux_per_class", "aux_weight")
    train_checked = base.Method.train_checked + ("auxiliary_loss",)
    report = ()

    initial_weights: tuple[float, ...] = ()
    every: int = 5
    beta: float = 1.0
    lr: Callable[[Any], Any] = lambda count: 0.01
    reduce: str = "mean"
    smooth: int = 1
    log_losses: bool = False
    log_min_loss: float = 0.02
    main_gradient: str = "primary"

    def __post_init__(self):
        super().__post_init__()
        if not self.aux_tasks or len(self.initial_weights) != len(self.aux_tasks):
            raise ValueError(f"olaux needs one initial weight per auxiliary task (at least one "
                             f"task); got {len(self.initial_weights)} for {len(self.aux_tasks)}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"olaux.every must be an integer >= 1, got {self.every!r}")
        if isinstance(self.smooth, bool) or not isinstance(self.smooth, int) or self.smooth < 1:
            raise ValueError(f"olaux.smooth must be an integer >= 1, got {self.smooth!r}")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"unknown olaux.reduce {self.reduce!r}; choose one of {REDUCTIONS}")
        if self.main_gradient not in MAIN_GRADIENTS:
            raise ValueError(f"unknown olaux.main_gradient {self.main_gradient!r}; choose one of "
                             f"{MAIN_GRADIENTS}")
        if not self.log_min_loss >= 0:
            raise ValueError(f"olaux.log_min_loss must be >= 0, got {self.log_min_loss!r}")

    # ------------------------------------------------------------------ building from a config
    @classmethod
    def defaults(cls) -> dict:
        return {"every": 5, **OURS, "log_min_loss": 0.02, "authors": False}

    @classmethod
    def settings(cls, fields) -> dict:
        """The constructor's settings from ``config.olaux``: its fields, with the authors' values
        of :data:`AUTHORS` in place when ``authors`` is on."""
        d = cls.defaults()
        s = {k: fields.get(k, d[k]) for k in ("every", *OURS, "log_min_loss")}
        if fields.get("authors", False):
            s.update(AUTHORS)
        return {"every": int(s["every"]), "beta": float(s["beta"]), "reduce": str(s["reduce"]),
                "smooth": int(s["smooth"]), "log_losses": bool(s["log_losses"]),
                "log_min_loss": float(s["log_min_loss"]),
                "main_gradient": str(s["main_gradient"])}

    @classmethod
    def check_fields(cls, fields) -> None:
        where = f"{cls.name}."
        validation.check_range("every", fields.every, "int", 1, prefix=where)
        validation.check_range("beta", fields.beta, "float", 0.0, prefix=where)
        validation.check_choice("reduce", fields.reduce, REDUCTIONS, prefix=where,
                                meaning="of the N products in a weight step: mean, ours; sum, the "
                                        "authors'")
        validation.check_range("smooth", fields.smooth, "int", 1, prefix=where)
        validation.check_range("log_min_loss", fields.log_min_loss, "float", 0.0, prefix=where)
        validation.check_choice("main_gradient", fields.main_gradient, MAIN_GRADIENTS,
                                prefix=where, meaning="the primary loss's gradient, ours; the "
                                                      "whole weighted loss's, the authors'")
        if fields.authors:
            for key, ours in OURS.items():
                if fields[key] != ours:
                    raise validation.ConfigError(
                        f"--config.{where}{key}={fields[key]!r} conflicts with --config.{where}"
                        f"authors=True, which sets {key}={AUTHORS[key]!r}: drop one of them (to "
                        f"vary the authors' settings, leave authors off and give each of "
                        f"{', '.join(OURS)})")

    @classmethod
    def mode_of(cls, config) -> dict[str, str]:
        s = cls.settings(config[cls.name])
        theirs = lambda key: " (the authors')" if s[key] == AUTHORS[key] else (  # noqa: E731
            " (ours)" if s[key] == OURS[key] else "")
        n = s["every"]
        step = (f"beta {s['beta']:g} x lr x {s['reduce']} of the {n} products"
                + (f" (= mean with beta {s['beta'] * n:g})" if s["reduce"] == "sum" else ""))
        k = s["smooth"]
        return {**super().mode_of(config),
                "weight step": step + theirs("reduce"),
                "gradient smoothing": ("none" if k == 1 else
                                       f"mean gradients of the last {k} steps") + theirs("smooth"),
                "log losses": (f"log L_pri, log(L_aux + {s['log_min_loss']:g})" if s["log_losses"]
                               else "no") + theirs("log_losses"),
                "main gradient": {"primary": "primary loss", "total": "whole weighted loss"}.get(
                    s["main_gradient"], s["main_gradient"]) + theirs("main_gradient")}

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        tasks = base.label_tasks(config, setup, default_tasks(setup))
        multitask, _ = base.networks(config, setup, sum(sum(t.psi) for t in tasks))
        return cls(multitask=multitask, multitask_optimizer=base.multitask_optimizer(config, setup),
                   aux_tasks=tasks, gamma=config.gamma,
                   initial_weights=(float(config.aux_weight),) * len(tasks),
                   lr=steps.step_lr_schedule(config.lr, setup.steps_per_epoch, config.decay_every),
                   **cls.settings(config.olaux))

    # ----------------------------------------------------------------------------- the state
    def init_method_state(self, rng, dummy_images):
        t = len(self.aux_tasks)
        state = {"weights": jnp.asarray(self.initial_weights, jnp.float32),
                 "dot_sum": jnp.zeros((t,), jnp.float32)}
        if self.smooth > 1:  # the last K steps' backbone gradients: (K, 1 + T, ...) per tensor
            shapes = jax.eval_shape(lambda r, x: self.multitask.init(r, x, False), rng,
                                    dummy_images)
            state["grad_history"] = jax.tree_util.tree_map(
                lambda p: jnp.zeros((self.smooth, 1 + t, *p.shape), jnp.float32),
                shapes["params"]["backbone"])
        return state

    # ------------------------------------------------------------------------------- the step
    def task_terms(self, values: jax.Array) -> jax.Array:
        """``(1 + T,)`` the terms the training loss weights: the task losses, or with
        ``log_losses`` ``log max(L_pri, LOG_FLOOR)`` and ``log(L_k + log_min_loss)``."""
        if not self.log_losses:
            return values
        return jnp.concatenate([jnp.log(jnp.maximum(values[:1], LOG_FLOOR)),
                                jnp.log(values[1:] + self.log_min_loss)])

    def products(self, state, grads, both):
        """``(T,)`` the step's products ``<main, g_k>`` over the backbone and the new gradient
        history (``None`` without smoothing)."""
        if self.smooth == 1:
            dots = base.shared_dots(grads)
            if self.main_gradient == "primary":
                return dots[0, 1:], None
            return (both.astype(dots.dtype) @ dots)[1:], None
        slot = state.step % self.smooth

        def record(history, g):
            main = g[0] if self.main_gradient == "primary" else jnp.tensordot(
                both.astype(g.dtype), g, axes=1)
            rows = jnp.concatenate([main[None], g[1:]]).astype(history.dtype)
            return history.at[slot].set(rows)

        history = jax.tree_util.tree_map(record, state.method_state["grad_history"],
                                         grads["backbone"])
        filled = jnp.minimum(state.step + 1, self.smooth).astype(jnp.float32)
        means = jax.tree_util.tree_map(lambda h: jnp.sum(h, axis=0) / filled.astype(h.dtype),
                                       history)
        return base.shared_dots({"backbone": means})[0, 1:], history

    def train_step(self, state, batch, axis_name=None):
        values, grads, stats, logits = self.task_gradients(
            state.multitask_params, state.multitask_batch_stats, batch, axis_name)
        weights = state.method_state["weights"]
        both = jnp.concatenate([jnp.ones((1,), weights.dtype), weights])
        terms = values
        if self.log_losses:  # grad f(L_t) = f'(L_t) grad L_t, task by task
            terms = self.task_terms(values)
            scale = jax.grad(lambda v: jnp.sum(self.task_terms(v)))(values)
            grads = jax.tree_util.tree_map(
                lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads)
        grad = base.combine_task_gradients(grads, both, both)
        products, history = self.products(state, grads, both)
        dot_sum = state.method_state["dot_sum"] + products
        # After every N-th step: w <- max(0, w + beta * alpha * (mean or sum) of the N products).
        due = (state.step + 1) % self.every == 0
        step = self.beta * self.lr(state.step) * dot_sum
        moved = jnp.maximum(weights + (step / self.every if self.reduce == "mean" else step), 0.0)
        method_state = {"weights": jnp.where(due, moved, weights),
                        "dot_sum": jnp.where(due, jnp.zeros_like(dot_sum), dot_sum)}
        if history is not None:
            method_state["grad_history"] = history
        new_state, norms = self.update_multitask(state, grad, stats, method_state=method_state)
        return new_state, {
            "loss": terms[0] + jnp.sum(weights * terms[1:]), "primary_loss": values[0],
            "auxiliary_loss": jnp.mean(values[1:]), "task_losses": values[1:],
            "task_weights": weights, "gradient_products": products,
            "accuracy": losses.accuracy(logits, batch["primary"], axis_name, batch.get("mask")), **norms}

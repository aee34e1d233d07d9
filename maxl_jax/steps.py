"""Building blocks shared by every method's pure steps: the reference's schedules and optimizers,
norms, and the update of the multi-task network.

The steps themselves live with their methods (``maxl_jax.methods``): ``train_step(state, batch)``,
``meta_step(state, batches)``, ``eval_step(state, batch)``, each ``-> (state, metrics)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def step_lr_schedule(base_lr: float, steps_per_epoch: int, every: int = 50, factor: float = 0.5,
                     offset: int = 0) -> optax.Schedule:
    """``base_lr * factor ** ((epoch + offset) // every)`` with ``epoch = count // steps_per_epoch``.

    ``offset = 0`` is PyTorch's ``StepLR(every, factor)`` stepped at the end of each epoch, as the
    reference steps its optimizers' schedulers (halved from 0-based epochs 50, 100, 150);
    ``offset = 1`` is the reference's inner step size, halved by ``if (index + 1) % 50 == 0`` at the
    start of epoch ``index`` (from epochs 49, 99, 149). ``count`` is the optimizer's update count, so
    ``steps_per_epoch`` must count that optimizer's updates per epoch.
    """
    def schedule(count):
        epoch = count // steps_per_epoch
        return base_lr * factor ** ((epoch + offset) // every)
    return schedule


def reference_optimizers(steps_per_epoch: int, lr: float = 0.01, generator_lr: float = 1e-3,
                         weight_decay: float = 5e-4, decay_every: int = 50,
                         inner_lr: float | None = None):
    """The reference's optimizers and inner step size, as ``(f_opt, g_opt, inner_lr_schedule)``.

    * theta1: SGD(``lr``), no momentum, no weight decay;
    * theta2: SGD(``generator_lr``) with L2 weight decay ``weight_decay`` added to the gradient;
      both halved every ``decay_every`` epochs from epoch ``decay_every`` on (the reference's
      ``StepLR`` schedulers step at the end of each epoch: lines 434-435 of ``model_vgg_maxl.py``);
    * the inner alpha (``inner_lr``, default ``lr``), halved one epoch earlier, from epoch
      ``decay_every - 1`` on (line 315: ``if (index + 1) % 50 == 0`` at the start of the epoch).

    Each schedule counts its own updates: ``steps_per_epoch`` theta1 updates and as many theta2
    updates per epoch (the reference's two passes); the inner alpha is a function of the theta2 count.
    """
    inner_lr = lr if inner_lr is None else inner_lr
    f_opt = optax.sgd(step_lr_schedule(lr, steps_per_epoch, decay_every))
    g_opt = optax.chain(optax.add_decayed_weights(weight_decay),
                        optax.sgd(step_lr_schedule(generator_lr, steps_per_epoch, decay_every)))
    return f_opt, g_opt, step_lr_schedule(inner_lr, steps_per_epoch, decay_every, offset=1)


def global_norm(tree: PyTree) -> jax.Array:
    """Euclidean norm of all leaves of ``tree`` together (0 for an empty tree)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum((jnp.sum(jnp.square(x)) for x in leaves), jnp.zeros((), jnp.float32)))


def apply_update(optimizer: optax.GradientTransformation, params: PyTree, opt_state: PyTree,
                 grads: PyTree) -> tuple[PyTree, PyTree, dict]:
    """One optax update: ``(new_params, new_opt_state, {grad_norm, update_norm, param_norm})``."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"grad_norm": global_norm(grads), "update_norm": global_norm(updates),
                               "param_norm": global_norm(params)}

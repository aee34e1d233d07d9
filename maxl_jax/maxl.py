"""MAXL as pure functions: generated labels, the multi-task loss and the exact meta-gradient.

Notation (shapes): images ``x (B, H, W, C)`` float, primary labels ``y (B,)`` int, ``P = len(psi)``
primary classes, ``K = sum(psi)`` auxiliary classes.

* Soft labels ``s = mask_softmax(g(x; theta2), y)``, ``(B, K)``.
* Training loss of f: ``L_train = L_pri(f_pri(x; theta1), y) + aux_weight * L_aux(f_aux(x; theta1), s)``
  with the focal loss (gamma 2) for both.
* Meta objective: ``L_meta(theta2) = L_pri(f_pri(x; theta1+)) + entropy_weight * H(s)`` with
  ``theta1+`` = ``k`` steps of the inner optimizer on ``L_train`` (one SGD step of size alpha in the
  reference), differentiated exactly. BatchNorm uses batch statistics in every forward; only the
  forward at theta1 updates f's running statistics.

WAMAL (weight-aware MAXL) is the same with a generator that also outputs one weight logit ``z`` per
example (``models.LabelGenerator(weight_head=True)``): ``w = 2^(2 r sigmoid(z) - r)`` in
``[2^-r, 2^r]`` (``example_weights``) and ``L_aux = mean(w * focal_b)``. Pass ``weight_range=r`` to
``generate_labels`` and ``generator_meta_gradient``; the meta-gradient then reaches the weight head too.
``weight_form="batch"`` is the authors' code's form instead, ``L_aux = mean(w) * mean(focal_b)``
(see ``maxl_jax.methods.wamal``).

Every function takes ``axis_name`` for use inside ``shard_map``: batch means and BatchNorm statistics
are then taken over the whole sharded batch, so results equal the single-device ones; and ``mask``
(``(B,)``, 0 for padding): means and BatchNorm statistics then ignore the padding examples, so a batch
padded to a multiple of the device count gives the unpadded batch's numbers.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import numpy as np
import jax.numpy as jnp
import optax

from maxl_jax import hierarchy, losses, meta, validation

PyTree = Any


def example_weights(weight_logits: jax.Array, weight_range: float, normalize: bool = False,
                    axis_name: str | None = None, mask: jax.Array | None = None) -> jax.Array:
    """WAMAL's per-example auxiliary weights ``w = 2^(2 r sigmoid(z) - r)``, in ``[2^-r, 2^r]``.

    With ``normalize`` the weights are divided by their batch mean (the authors' optional
    normalisation; the range no longer holds then). ``weight_logits``: ``(B,)``; returns ``(B,)``.
    """
    w = jnp.exp2(2.0 * weight_range * jax.nn.sigmoid(weight_logits) - weight_range)
    return w / losses.batch_mean(w, axis_name, mask) if normalize else w


def generate_labels(generator: nn.Module, gen_variables: PyTree, x: jax.Array, y: jax.Array,
                    psi: Sequence[int], *, train: bool = True, axis_name: str | None = None,
                    weight_range: float | None = None, normalize_weights: bool = False,
                    mask: jax.Array | None = None):
    """Soft auxiliary labels ``(B, sum(psi))`` and g's updated BatchNorm statistics.

    In train mode (the reference's setting) BatchNorm uses batch statistics and the running statistics
    are updated; in eval mode the running statistics are used and returned unchanged. With
    ``weight_range`` (WAMAL; the generator has a weight head) the labels are ``(soft, w)`` with ``w``
    the ``(B,)`` per-example auxiliary weights of ``example_weights``.
    """
    if train:
        out, updated = generator.apply(gen_variables, x, True, axis_name, mask,
                                       mutable=["batch_stats"])
        stats = updated["batch_stats"]
    else:
        out = generator.apply(gen_variables, x, False)
        stats = gen_variables["batch_stats"]
    if weight_range is None:
        return losses.mask_softmax(out, y, psi), stats
    logits, weight_logits = out
    weights = example_weights(weight_logits, weight_range, normalize_weights, axis_name, mask)
    return (losses.mask_softmax(logits, y, psi), weights), stats


def multitask_loss(multitask: nn.Module, params: PyTree, batch_stats: PyTree, x: jax.Array,
                   y: jax.Array, aux_targets: jax.Array | None, *, aux_weight: float = 1.0,
                   gamma: float = 2.0, axis_name: str | None = None,
                   aux_example_weights: jax.Array | None = None, weight_form: str = "example",
                   mask: jax.Array | None = None):
    """``L_pri + aux_weight * L_aux`` of f in train mode (batch statistics).

    Args:
      aux_targets: ``(B, K_aux)`` one-hot or soft auxiliary targets, or ``None`` for single-task
        training (``L_pri`` alone).
      aux_example_weights: ``(B,)`` per-example weights of the auxiliary loss (WAMAL):
        ``L_aux = mean(w * focal_b)``; ``None``: unweighted.
      weight_form: how the weights enter: ``"example"`` (the paper's ``mean(w * focal_b)``) or
        ``"batch"`` (the authors' code's ``mean(w) * mean(focal_b)``: one weight per batch).
    Returns:
      ``(loss, (new_batch_stats, parts))`` with ``parts`` holding ``primary``, ``auxiliary`` (0 for
      single-task) and ``primary_logits``.
    """
    (primary_logits, aux_logits), updated = multitask.apply(
        {"params": params, "batch_stats": batch_stats}, x, True, axis_name, mask,
        mutable=["batch_stats"])
    primary = losses.primary_focal_loss(primary_logits, y, gamma, axis_name, mask)
    if aux_targets is None:
        auxiliary = jnp.zeros_like(primary)
        total = primary
    elif aux_example_weights is None:
        auxiliary = losses.focal_loss(aux_logits, aux_targets, gamma, axis_name, mask)
        total = primary + aux_weight * auxiliary
    else:
        per_example = losses.focal_loss_per_example(jax.nn.log_softmax(aux_logits, -1),
                                                    aux_targets, gamma)
        if weight_form == "example":
            auxiliary = losses.batch_mean(aux_example_weights * per_example, axis_name, mask)
        elif weight_form == "batch":
            auxiliary = (losses.batch_mean(aux_example_weights, axis_name, mask)
                         * losses.batch_mean(per_example, axis_name, mask))
        else:
            raise ValueError(f"unknown weight_form {weight_form!r}; choose 'example' or 'batch'")
        total = primary + aux_weight * auxiliary
    parts = {"primary": primary, "auxiliary": auxiliary, "primary_logits": primary_logits}
    return total, (updated["batch_stats"], parts)


class MaxlMetaGradient(NamedTuple):
    """Result of ``generator_meta_gradient``: ``grad`` w.r.t. the generator's params (same tree), the meta
    objective, f's and g's updated BatchNorm statistics, and diagnostics (``metrics``)."""

    grad: PyTree
    meta_loss: jax.Array
    multitask_batch_stats: PyTree
    generator_batch_stats: PyTree
    soft_labels: jax.Array
    metrics: dict
    example_weights: jax.Array | None = None  # WAMAL's (B,) auxiliary weights, else None


def generator_meta_gradient(multitask: nn.Module, generator: nn.Module,
                            multitask_variables: PyTree, generator_variables: PyTree, x: jax.Array,
                            y: jax.Array, psi: Sequence[int], *,
                            inner_optimizer: optax.GradientTransformation | None = None,
                            inner_lr: float | jax.Array = 0.01, inner_steps: int = 1,
                            entropy_weight: float = 0.2, aux_weight: float = 1.0,
                            gamma: float = 2.0, form: str = "reverse",
                            axis_name: str | None = None, weight_range: float | None = None,
                            normalize_weights: bool = False, weight_form: str = "example",
                            validate: bool = True,
                            mask: jax.Array | None = None) -> MaxlMetaGradient:
    """Exact gradient w.r.t. theta2 of ``L_pri(f(x; theta1+)) + entropy_weight * H(g(x; theta2))``.

    ``theta1+`` comes from ``inner_steps`` updates of ``inner_optimizer`` (default: plain SGD with
    step ``inner_lr``, as the reference) on ``L_pri + aux_weight * L_aux``. The derivative goes
    through the inner update (second order) into the soft labels ``s``; ``jax.vjp`` of the generator
    then carries it to theta2. ``form`` picks the estimator for ``d L_meta / d s`` (see ``meta``).
    With ``weight_range`` (WAMAL) the generator also gives per-example weights ``w``: the inner loss
    is ``L_pri + aux_weight * mean(w * focal_b)`` and the derivative reaches the weight head through
    ``w`` as well; ``weight_form`` as in ``multitask_loss``.

    Args:
      multitask_variables / generator_variables: ``{'params', 'batch_stats'}`` of f and g.
      x: ``(B, H, W, C)`` float images; y: ``(B,)`` int primary labels in ``[0, len(psi))``.
      validate: check ``x``, ``y`` and ``psi`` against the networks first (``ValueError`` naming
        the argument); label values are checked when concrete (outside ``jit``). ``False`` skips it.
    """
    psi = hierarchy.validate_psi(psi)
    if validate:
        validation.check_hierarchy(psi, multitask.num_primary,
                                   {"the multi-task network's auxiliary head": multitask.num_auxiliary,
                                    "the label generator": generator.num_auxiliary})
        validation.check_images(x, "x (images)")
        validation.check_labels(y, len(psi), "y (primary labels)", batch=np.shape(x)[0])
    if inner_optimizer is None:
        inner_optimizer = optax.sgd(inner_lr)

    def labels_of(gen_params):
        out, stats = generate_labels(
            generator, {"params": gen_params, "batch_stats": generator_variables["batch_stats"]},
            x, y, psi, train=True, axis_name=axis_name, weight_range=weight_range,
            normalize_weights=normalize_weights, mask=mask)
        return (out if weight_range is not None else (out, None)), stats

    (soft, weights), labels_vjp, gen_stats = jax.vjp(labels_of, generator_variables["params"],
                                                     has_aux=True)
    mt_stats = multitask_variables["batch_stats"]

    def inner_loss(params, labels):
        s, w = labels
        return multitask_loss(multitask, params, mt_stats, x, y, s, aux_weight=aux_weight,
                              gamma=gamma, axis_name=axis_name, aux_example_weights=w,
                              weight_form=weight_form, mask=mask)

    def outer_loss(params_plus, labels):
        s, _ = labels
        # Batch statistics at theta1+; its running-statistics update is discarded (as the reference).
        primary_logits, _ = multitask.apply({"params": params_plus, "batch_stats": mt_stats}, x,
                                            True, axis_name, mask, mutable=["batch_stats"])[0]
        primary = losses.primary_focal_loss(primary_logits, y, gamma, axis_name, mask)
        entropy = losses.entropy_term(s, axis_name, mask)
        return primary + entropy_weight * entropy, {"primary_after": primary, "entropy": entropy,
                                                    "primary_logits_after": primary_logits}

    result = meta.meta_gradient(inner_loss, outer_loss, multitask_variables["params"],
                                (soft, weights), inner_optimizer, steps=inner_steps, form=form)
    (grad,) = labels_vjp(result.grad_hyper)
    new_mt_stats, parts = result.inner_aux
    metrics = {
        "primary_before": parts["primary"],
        "auxiliary_before": parts["auxiliary"],
        "accuracy_before": losses.accuracy(parts["primary_logits"], y, axis_name, mask),
        "primary_after": result.outer_aux["primary_after"],
        "accuracy_after": losses.accuracy(result.outer_aux["primary_logits_after"], y, axis_name,
                                          mask),
        "entropy_term": result.outer_aux["entropy"],
    }
    return MaxlMetaGradient(grad, result.outer_loss, new_mt_stats, gen_stats, soft, metrics,
                            weights)



def meta_gradient(*args, **kwargs) -> MaxlMetaGradient:
    """Deprecated name of :func:`generator_meta_gradient` (MAXL's meta-gradient w.r.t. the label
    generator, result field ``.grad``), renamed so that it is not confused with the estimators'
    ``maxl_jax.meta.meta_gradient`` (any inner/outer loss, result field ``.grad_hyper``)."""
    warnings.warn("maxl_jax.meta_gradient / maxl_jax.maxl.meta_gradient is deprecated: call "
                  "maxl_jax.generator_meta_gradient (same arguments and result)",
                  DeprecationWarning, stacklevel=2)
    return generator_meta_gradient(*args, **kwargs)

def reference_first_order_meta_gradient(
        multitask: nn.Module, generator: nn.Module, multitask_variables: PyTree,
        generator_variables: PyTree, x: jax.Array, y: jax.Array, psi: Sequence[int], *,
        alpha: float | jax.Array = 0.01, aux_weight: float = 1.0, gamma: float = 2.0,
        radius: float = meta.REFERENCE_RADIUS, entropy_weight: float = 0.2,
        axis_name: str | None = None, mask: jax.Array | None = None) -> MaxlMetaGradient:
    """The reference's first-order meta step exactly as ``model_vgg_maxl_firstorder.py`` runs it.

    ``theta1+ = theta1 - alpha grad L_train(theta1)`` (plain SGD); ``v = grad L_pri(theta1+)``;
    ``eps = radius / ||v||``; the generator's gradient is

        - alpha * [grad_theta2 L_train(theta1 + eps v) - grad_theta2 L_train(theta1 - eps v)] / (2 eps)

    and nothing else: the entropy term never reaches the generator (the reference overwrites the
    generator's gradient with this difference). Every forward of f and g runs in train mode and
    updates its BatchNorm running statistics, in the reference's order: f and g at theta1, then f
    and g at ``theta1 + eps v``, then at ``theta1 - eps v`` (three updates of each per meta step;
    the forward at theta1+ runs on a copy and its statistics are dropped). ``alpha`` is the caller's:
    the reference passes theta1's current learning rate. ``meta_loss`` is the reference's logged
    objective ``L_pri(theta1+) + entropy_weight * H(s)``, whose entropy part has no gradient here.
    Compare ``generator_meta_gradient(form="finite_difference")``: the same difference at the same points,
    but with the entropy term's gradient kept and f's statistics updated once.
    """
    psi = hierarchy.validate_psi(psi)
    params, stats0 = multitask_variables["params"], multitask_variables["batch_stats"]
    gen_params = generator_variables["params"]

    def train_loss(p, stats, soft):
        return multitask_loss(multitask, p, stats, x, y, soft, aux_weight=aux_weight, gamma=gamma,
                              axis_name=axis_name, mask=mask)

    soft, g_stats = generate_labels(generator, generator_variables, x, y, psi, train=True,
                                    axis_name=axis_name, mask=mask)
    (_, (f_stats, parts)), g = jax.value_and_grad(train_loss, has_aux=True)(params, stats0, soft)
    plus = jax.tree_util.tree_map(lambda w, d: w - alpha * d, params, g)

    def primary_after(p):
        logits, _ = multitask.apply({"params": p, "batch_stats": stats0}, x, True, axis_name, mask,
                                    mutable=["batch_stats"])[0]
        return losses.primary_focal_loss(logits, y, gamma, axis_name, mask), logits

    (primary_plus, logits_plus), v = jax.value_and_grad(primary_after, has_aux=True)(plus)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(t)) for t in jax.tree_util.tree_leaves(v)))
    eps = radius / jnp.maximum(norm, 1e-30)

    def generator_grad(sign, f_stats_in, g_stats_in):
        shifted = jax.tree_util.tree_map(lambda w, d: w + sign * eps * d, params, v)

        def loss_of(gp):
            s, g_out = generate_labels(generator, {"params": gp, "batch_stats": g_stats_in}, x, y,
                                       psi, train=True, axis_name=axis_name, mask=mask)
            loss, (f_out, _) = train_loss(shifted, f_stats_in, s)
            return loss, (f_out, g_out)

        return jax.grad(loss_of, has_aux=True)(gen_params)

    grad_p, (f_stats, g_stats) = generator_grad(1.0, f_stats, g_stats)
    grad_n, (f_stats, g_stats) = generator_grad(-1.0, f_stats, g_stats)
    grad = jax.tree_util.tree_map(lambda a, b: -alpha * (a - b) / (2 * eps), grad_p, grad_n)
    entropy = losses.entropy_term(soft, axis_name, mask)
    metrics = {
        "primary_before": parts["primary"], "auxiliary_before": parts["auxiliary"],
        "accuracy_before": losses.accuracy(parts["primary_logits"], y, axis_name, mask),
        "primary_after": primary_plus,
        "accuracy_after": losses.accuracy(logits_plus, y, axis_name, mask),
        "entropy_term": entropy,
    }
    return MaxlMetaGradient(grad, primary_plus + entropy_weight * entropy, f_stats, g_stats, soft,
                            metrics)


def _entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def label_statistics(soft: jax.Array, y: jax.Array, psi: Sequence[int],
                     axis_name: str | None = None, mask: jax.Array | None = None) -> dict:
    """Summaries of generated labels ``soft (B, K)`` for primary labels ``y (B,)``.

    Returns:
      ``label_entropy``: mean per-example entropy (nats; 0 = one-hot labels).
      ``usage_entropy``: entropy of the batch-mean label (how many auxiliary classes are in use).
      ``soft_label_sum (K,)``, ``primary_count (P,)``, ``label_entropy_sum (P,)``: sums over the batch
        (and devices), to accumulate over an epoch and pass to ``block_usage``.
    """
    psi = hierarchy.validate_psi(psi)
    per_example = _entropy(soft)
    one_hot_y = jax.nn.one_hot(y, len(psi), dtype=soft.dtype)
    if mask is not None:  # padding examples count for nothing
        w = mask.astype(soft.dtype)
        one_hot_y, soft_sum = one_hot_y * w[:, None], w @ soft
    else:
        soft_sum = jnp.sum(soft, 0)
    sums = {
        "soft_label_sum": soft_sum,
        "primary_count": jnp.sum(one_hot_y, 0),
        "label_entropy_sum": one_hot_y.T @ per_example,
    }
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return {"label_entropy": losses.batch_mean(per_example, axis_name, mask),
            "usage_entropy": _entropy(losses.batch_mean(soft, axis_name, mask)), **sums}


def block_usage(soft_label_sum: jax.Array, primary_count: jax.Array, label_entropy_sum: jax.Array,
                psi: Sequence[int]) -> dict:
    """Per primary class: how its examples spread over its own auxiliary block.

    Returns arrays of shape ``(P,)``: ``usage_entropy`` (entropy of the class's mean label inside its
    block, divided by ``log psi[c]``: 1 = all auxiliary classes used equally, 0 = one class),
    ``effective_classes`` (``exp`` of the unnormalised entropy), ``label_entropy`` (mean per-example
    entropy: near ``log psi[c]`` means near-uniform soft labels, the collapse to watch for).
    """
    psi = hierarchy.validate_psi(psi)
    indicator = jnp.asarray(hierarchy.block_indicator(psi))             # (P, K)
    block = indicator * soft_label_sum[None, :]                          # (P, K)
    dist = block / jnp.maximum(jnp.sum(block, -1, keepdims=True), 1e-30)
    ent = _entropy(dist)
    log_psi = jnp.log(jnp.asarray(psi, jnp.float32))
    norm = jnp.where(log_psi > 0, ent / jnp.where(log_psi > 0, log_psi, 1.0), 0.0)
    return {"usage_entropy": norm, "effective_classes": jnp.exp(ent),
            "label_entropy": label_entropy_sum / jnp.maximum(primary_count, 1.0)}

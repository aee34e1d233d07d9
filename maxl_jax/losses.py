"""MAXL's losses, on logits, as the reference code computes them but numerically stable.

Shapes: ``B`` examples, ``K`` classes. Every batch mean takes an optional ``axis_name``: inside a
``shard_map``/``pmap`` over that axis the mean is taken over the global batch (``lax.pmean``), so the
result equals the single-device value; and an optional ``mask`` (``(B,)``, 0 for padding examples):
the mean is then over the real examples alone.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxl_jax import hierarchy

# The reference adds 1e-20 inside every log: log(p + 1e-20).
LOG_EPS = float(np.log(1e-20))


def batch_mean(x: jnp.ndarray, axis_name: str | None = None,
               mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Mean over the leading (batch) axis, over all devices of ``axis_name`` when given, over the
    examples with ``mask`` 1 when given."""
    if mask is None:
        m = jnp.mean(x, axis=0)
        return m if axis_name is None else jax.lax.pmean(m, axis_name)
    w = mask.astype(x.dtype)
    total = jnp.sum(x * w.reshape((-1,) + (1,) * (x.ndim - 1)), axis=0)
    count = jnp.sum(w)
    if axis_name is not None:
        total, count = jax.lax.psum((total, count), axis_name)
    return total / count


def accuracy(logits: jnp.ndarray, labels: jnp.ndarray, axis_name: str | None = None,
             mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Top-1 accuracy of ``logits (B, K)`` against int ``labels (B,)``."""
    return batch_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), axis_name, mask)


def log_plus_eps(log_p: jnp.ndarray) -> jnp.ndarray:
    """``log(p + 1e-20)`` computed from ``log p`` without underflow: ``logaddexp(log p, log 1e-20)``."""
    return jnp.logaddexp(log_p, LOG_EPS)


def mask_log_softmax(logits: jnp.ndarray, primary_labels: jnp.ndarray,
                     psi: Sequence[int]) -> jnp.ndarray:
    """Log of the reference's mask softmax, ``log softmax(z + log mask)``.

    The reference computes ``exp(z) * mask / sum(exp(z) * mask)`` with ``mask = 1`` on the auxiliary
    block of the true primary class and ``1e-8`` elsewhere; adding ``log mask`` to the logits gives the
    same distribution without overflow.

    Args:
      logits: ``(B, sum(psi))`` generator logits.
      primary_labels: int ``(B,)`` true primary classes.
    Returns:
      ``(B, sum(psi))`` log-probabilities.
    """
    return jax.nn.log_softmax(logits + hierarchy.log_batch_mask(primary_labels, psi), axis=-1)


def mask_softmax(logits: jnp.ndarray, primary_labels: jnp.ndarray,
                 psi: Sequence[int]) -> jnp.ndarray:
    """The generator's soft auxiliary labels ``(B, sum(psi))``; rows sum to 1 (see mask_log_softmax)."""
    return jnp.exp(mask_log_softmax(logits, primary_labels, psi))


def focal_loss_per_example(log_probs: jnp.ndarray, targets: jnp.ndarray,
                           gamma: float = 2.0) -> jnp.ndarray:
    """Focal loss on probabilities, per example: ``-sum_k y_k (1 - p_k)^gamma log(p_k + 1e-20)``.

    Args:
      log_probs: ``(B, K)`` log-probabilities of the prediction (``log_softmax`` of a head's logits).
      targets: ``(B, K)`` one-hot or soft targets ``y``.
    Returns:
      ``(B,)``.
    """
    p = jnp.exp(log_probs)
    return -jnp.sum(targets * (1.0 - p) ** gamma * log_plus_eps(log_probs), axis=-1)


def focal_loss(logits: jnp.ndarray, targets: jnp.ndarray, gamma: float = 2.0,
               axis_name: str | None = None, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Batch mean of the focal loss of a softmax head with logits ``(B, K)`` and targets ``(B, K)``."""
    return batch_mean(focal_loss_per_example(jax.nn.log_softmax(logits, axis=-1), targets, gamma),
                      axis_name, mask)


def primary_focal_loss(logits: jnp.ndarray, labels: jnp.ndarray, gamma: float = 2.0,
                       axis_name: str | None = None, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Focal loss against hard labels: int ``labels (B,)``, ``logits (B, K)``."""
    return focal_loss(logits, jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), gamma,
                      axis_name, mask)


def entropy_term(probs: jnp.ndarray, axis_name: str | None = None,
                 mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """The generator's anti-collapse term ``H = sum_k pbar_k log(pbar_k + 1e-20)``.

    ``pbar = mean over the batch of probs (B, K)``. ``H`` is a negative entropy: it is smallest
    (``-log K``) when ``pbar`` is uniform, so minimising it spreads the batch over all classes.
    """
    pbar = batch_mean(probs, axis_name, mask)
    return jnp.sum(pbar * jnp.log(pbar + 1e-20))


def task_focal_losses(aux_logits: jnp.ndarray, targets: jnp.ndarray, sizes: Sequence[int],
                      gamma: float = 2.0) -> jnp.ndarray:
    """Per-example focal losses of several auxiliary tasks sharing one head.

    The auxiliary head's ``K = sum(sizes)`` outputs are the concatenated logits of ``T = len(sizes)``
    tasks; each task is a softmax over its own slice.

    Args:
      aux_logits: ``(B, K)``; targets: ``(B, K)`` one-hot or soft targets, concatenated alike.
    Returns:
      ``(B, T)``: the focal loss of each example on each task.
    """
    out, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        out.append(focal_loss_per_example(jax.nn.log_softmax(aux_logits[:, sl], axis=-1),
                                          targets[:, sl], gamma))
        start += size
    if start != aux_logits.shape[-1]:
        raise ValueError(f"the auxiliary head has {aux_logits.shape[-1]} outputs but the tasks need "
                         f"sum({list(sizes)}) = {start}")
    return jnp.stack(out, axis=-1)

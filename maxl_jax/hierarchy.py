"""The class hierarchy ``psi`` that ties auxiliary classes to primary classes.

``psi[i]`` is the number of auxiliary classes owned by primary class ``i``. Auxiliary class indices
``[sum(psi[:i]), sum(psi[:i+1]))`` belong to primary class ``i`` (MAXL, Liu et al. 2019). The CIFAR-100
experiment uses 20 primary superclasses and ``psi = [5] * 20``.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import jax.numpy as jnp
import numpy as np

# Off-block value of the reference's mask: 1e-8 rather than 0 ("to avoid nans").
OFF_BLOCK_MASK = 1e-8


def validate_psi(psi: Sequence[int], num_primary: int | None = None) -> tuple[int, ...]:
    """Checks ``psi`` and returns it as a tuple of Python ints.

    Raises:
      ValueError: naming the bad entry, if ``psi`` is empty, holds a non-integer or a non-positive
        entry, or has a length different from ``num_primary`` (when given).
    """
    if isinstance(psi, (str, bytes)) or not hasattr(psi, "__len__"):
        raise ValueError(
            f"psi must be a sequence of positive integers (auxiliary classes per primary class), "
            f"got {psi!r}; e.g. psi=[5]*20 for CIFAR-100's 20 superclasses.")
    psi_list = list(np.asarray(psi).ravel()) if isinstance(psi, np.ndarray) else list(psi)
    if not psi_list:
        raise ValueError("psi is empty: give one positive integer per primary class, e.g. psi=[5]*20.")
    out = []
    for i, entry in enumerate(psi_list):
        if isinstance(entry, (bool, np.bool_)) or not isinstance(entry, numbers.Integral):
            if (not isinstance(entry, (bool, np.bool_)) and isinstance(entry, numbers.Real)
                    and float(entry).is_integer()):
                entry = int(entry)
            else:
                raise ValueError(
                    f"psi[{i}] = {entry!r} is not an integer: each entry counts the auxiliary classes "
                    f"of one primary class.")
        if entry <= 0:
            raise ValueError(
                f"psi[{i}] = {entry} is not positive: every primary class needs at least one "
                f"auxiliary class.")
        out.append(int(entry))
    if num_primary is not None and len(out) != num_primary:
        raise ValueError(
            f"psi has {len(out)} entries but the primary task has {num_primary} classes: give one "
            f"entry per primary class (e.g. psi=[5]*{num_primary}).")
    return tuple(out)


def num_auxiliary(psi: Sequence[int]) -> int:
    """Total number of auxiliary classes, ``sum(psi)``."""
    return int(sum(validate_psi(psi)))


def block_starts(psi: Sequence[int]) -> np.ndarray:
    """Start index of each primary class's auxiliary block, shape ``(len(psi),)``."""
    psi = validate_psi(psi)
    return np.concatenate([[0], np.cumsum(psi)[:-1]]).astype(np.int32)


def auxiliary_to_primary(psi: Sequence[int]) -> np.ndarray:
    """The primary class owning each auxiliary class, int32 of shape ``(sum(psi),)``."""
    psi = validate_psi(psi)
    return np.repeat(np.arange(len(psi), dtype=np.int32), psi)


def block_indicator(psi: Sequence[int]) -> np.ndarray:
    """``(len(psi), sum(psi))`` float32 matrix, 1 where the auxiliary class belongs to the primary."""
    psi = validate_psi(psi)
    owner = auxiliary_to_primary(psi)
    return (owner[None, :] == np.arange(len(psi))[:, None]).astype(np.float32)


def batch_mask(primary_labels: jnp.ndarray, psi: Sequence[int],
               off_value: float = OFF_BLOCK_MASK) -> jnp.ndarray:
    """The reference's mask: ``mask[b, j] = 1`` if auxiliary class ``j`` belongs to the true primary
    class of example ``b``, else ``off_value`` (1e-8).

    Args:
      primary_labels: int array ``(B,)`` of primary classes in ``[0, len(psi))``.
    Returns:
      float32 ``(B, sum(psi))``.
    """
    owner = jnp.asarray(auxiliary_to_primary(psi))
    inside = owner[None, :] == primary_labels[:, None]
    return jnp.where(inside, 1.0, off_value).astype(jnp.float32)


def log_batch_mask(primary_labels: jnp.ndarray, psi: Sequence[int],
                   off_value: float = OFF_BLOCK_MASK) -> jnp.ndarray:
    """``log(batch_mask(...))``: 0 inside the true block, ``log(off_value)`` (about -18.42) outside."""
    owner = jnp.asarray(auxiliary_to_primary(psi))
    inside = owner[None, :] == primary_labels[:, None]
    return jnp.where(inside, 0.0, float(np.log(off_value))).astype(jnp.float32)

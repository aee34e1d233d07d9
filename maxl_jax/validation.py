"""Checks of what users give us, before anything is compiled or written: a run's configuration, and
the arrays passed to the public pure functions. Every failure is a ``ConfigError`` or ``ValueError``
whose message names the setting or argument, the value, and what would be valid.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxl_jax import precision


class ConfigError(ValueError):
    """A configuration value out of its range, of the wrong type, or one the method cannot use."""


# field -> (kind, lower bound, inclusive): "int" / "float" / "bool" / "str".
RANGES: dict[str, tuple[str, float | None, bool]] = {
    "epochs": ("int", 1, True),
    "batch_size": ("int", 1, True),
    "eval_batch_size": ("int", 1, True),
    "lr": ("float", 0.0, False),
    "generator_lr": ("float", 0.0, False),
    "inner_lr": ("float", 0.0, True),
    "weight_decay": ("float", 0.0, True),
    "decay_every": ("int", 1, True),
    "inner_steps": ("int", 1, True),
    "entropy_weight": ("float", 0.0, True),
    "aux_weight": ("float", 0.0, True),
    "gamma": ("float", 0.0, True),
    "aux_per_class": ("int", 1, True),
    "seed": ("int", 0, True),
    "max_steps_per_epoch": ("int", 0, True),
    "checkpoint_every_steps": ("int", 0, True),
    "steps_per_call": ("int", 0, True),
    "keep_checkpoints": ("int", 1, True),
    "last_k": ("int", 1, True),
    "eval_every": ("int", 1, True),
    "resume_step": ("int", 0, True),
    "validation_size": ("int", 1, True),
    "width": ("int", 0, True),
    "head_width": ("int", 0, True),
    "train_fraction": ("float", 0.0, False),
}

_HINTS = {
    "epochs": "train at least one epoch",
    "keep_checkpoints": "keep at least the final checkpoint",
    "max_steps_per_epoch": "0 means the whole training set each epoch",
    "checkpoint_every_steps": "0 means a checkpoint at the end of each epoch only",
    "steps_per_call": "0 picks 1 on the CPU and 20 on a GPU or TPU",
    "width": "0 means the architecture's default",
    "head_width": "0 means the architecture's default",
    "inner_lr": "0 turns the meta step's look-ahead off",
    "eval_every": "1 evaluates after every epoch",
    "resume_step": "0 resumes from the newest checkpoint",
}


def _number(name: str, value: Any, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"--config.{name}={value!r} is not a number; it needs "
                          f"{'an integer' if kind == 'int' else 'a number'}")
    if kind == "int" and float(value) != int(value):
        raise ConfigError(f"--config.{name}={value!r} is not an integer")
    if not np.isfinite(float(value)):
        raise ConfigError(f"--config.{name}={value!r} is not finite")
    return float(value)


def check_range(name: str, value: Any, kind: str, low: float | None, inclusive: bool = True,
                high: float | None = None, prefix: str = "") -> None:
    """Raises ``ConfigError`` unless ``value`` is a ``kind`` number in its range."""
    v = _number(prefix + name, value, kind)
    bad_low = low is not None and (v < low if inclusive else v <= low)
    bad_high = high is not None and v > high
    if bad_low or bad_high:
        lo = "" if low is None else (f">= {low:g}" if inclusive else f"> {low:g}")
        hi = "" if high is None else f"<= {high:g}"
        need = " and ".join(x for x in (lo, hi) if x)
        hint = _HINTS.get(name)
        raise ConfigError(f"--config.{prefix}{name}={value!r} is out of range: it must be {need}"
                          + (f" ({hint})" if hint else ""))


def check_choice(name: str, value: Any, choices: Sequence[str], prefix: str = "",
                 meaning: str = "") -> None:
    """Raises ``ConfigError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"--config.{prefix}{name}={value!r} is not one of "
                          f"{', '.join(map(repr, choices))}" + (f" ({meaning})" if meaning else ""))


def check_precision(config) -> None:
    """``dtype`` is one of ``precision.DTYPES`` and ``loss_scale`` a power of two (scaling and
    unscaling gradients by it is then exact; 1: none)."""
    dtype = config.get("dtype", "float32") if "dtype" in config else "float32"
    if not isinstance(dtype, str) or dtype not in precision.DTYPES:
        raise ConfigError(f"--config.dtype={dtype!r} is not a supported compute dtype; choose one "
                          f"of {', '.join(precision.DTYPES)} (parameters, optimizer states and "
                          f"losses stay float32 whichever it is)")
    if "loss_scale" in config:
        scale = config["loss_scale"]
        check_range("loss_scale", scale, "float", 0.0, False)
        if 2.0 ** round(np.log2(float(scale))) != float(scale):
            raise ConfigError(f"--config.loss_scale={scale!r} is not a power of two (1 means no "
                              f"loss scaling; see maxl_jax/precision.py)")


# ----------------------------------------------------------------------------------- arrays


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_images(images, name: str = "images", channels: int | None = None) -> None:
    """``(B, H, W, C)`` floating images (already normalised)."""
    shape = np.shape(images)
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    if len(shape) != 4:
        raise ValueError(f"{name} has shape {tuple(shape)}; expected (batch, height, width, "
                         f"channels)")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} has dtype {dtype}; expected float images, normalised (e.g. "
                         f"maxl_jax.data.normalize(uint8_images))")
    if channels is not None and shape[-1] != channels:
        raise ValueError(f"{name} has {shape[-1]} channels; the network was built for {channels}")


def check_labels(labels, num_classes: int, name: str = "labels", batch: int | None = None) -> None:
    """Integer ``(B,)`` labels in ``[0, num_classes)`` (the range only when the values are concrete,
    i.e. outside ``jit``)."""
    shape = np.shape(labels)
    dtype = labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype
    if len(shape) != 1 or (batch is not None and shape[0] != batch):
        raise ValueError(f"{name} has shape {tuple(shape)}; expected ({batch if batch else 'batch'},)")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} has dtype {dtype}; expected integer class labels")
    if _concrete(labels):
        values = np.asarray(labels)
        bad = np.flatnonzero((values < 0) | (values >= num_classes))
        if bad.size:
            raise ValueError(f"{name}[{bad[0]}] = {values[bad[0]]} is outside [0, {num_classes}): "
                             f"the labels index {num_classes} classes")


def check_hierarchy(psi: Sequence[int], num_primary: int, heads: Mapping[str, int]) -> None:
    """``len(psi) == num_primary`` and every named head has ``sum(psi)`` outputs."""
    if len(psi) != num_primary:
        raise ValueError(f"psi has {len(psi)} entries but the multi-task network has {num_primary} "
                         f"primary classes: give one entry per primary class")
    for name, size in heads.items():
        if size != sum(psi):
            raise ValueError(f"{name} has {size} outputs but psi needs sum(psi) = {sum(psi)}: build "
                             f"the networks with sum(psi) auxiliary classes")


_MOVED = {"validate_config": "maxl_jax.config_checks.validate_config",
          "ignored_settings": "maxl_jax.config_checks.ignored_settings"}


def __getattr__(name):
    if name in _MOVED:  # moved out so that this module imports no method (no import cycle)
        raise AttributeError(f"maxl_jax.validation.{name} moved to {_MOVED[name]} (it needs the "
                             f"method registry, which imports this module)")
    raise AttributeError(f"module 'maxl_jax.validation' has no attribute {name!r}")

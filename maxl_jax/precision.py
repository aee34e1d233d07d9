"""Mixed precision: the networks compute in a lower dtype, everything that accumulates stays float32.

``--config.dtype`` (``"float32"``, the default; ``"bfloat16"``; ``"float16"``) is the dtype the
networks' convolutions, matrix products, ReLUs and max-pools run in. What stays float32 whatever it is:

* the parameters and their optimizer states (created float32; each use casts a copy, "cast at use",
  so every gradient is a float32 array accumulated into float32 parameters);
* BatchNorm's batch statistics, normalisation and running statistics (``models.BatchNorm`` takes its
  input to float32 first: a mean over 100 x 32 x 32 values in bfloat16's 8-bit mantissa would lose
  most of its digits);
* the networks' outputs (logits are cast to float32 before they leave a network), so every softmax,
  log-softmax, focal loss, entropy term and batch mean is float32;
* the meta-gradient: the inner update ``theta1+ = theta1 - alpha g`` is float32 (``g`` is a float32
  gradient of float32 parameters), the soft labels are float32, and the meta-gradient reaches the
  generator's float32 parameters through float32 casts.

bfloat16 keeps float32's exponent range, so nothing under- or overflows that would not in float32;
only the mantissa is shorter (8 significant bits: a relative error of at most 2^-9 per rounding).
It is the dtype to use on TPUs and Ampere-or-newer GPUs (A100, H100, H200). On the CPU keep float32:
XLA:CPU has no faster bfloat16 matmul on the 2-core AMD EPYC measured here, and the small CNN's
MAXL steps ran 1.25-1.3x slower in bfloat16 (``benchmarks/results/precision_cpu.md``).

float16 (5-bit exponent: values above 65504 overflow, gradients below ~6e-8 flush to zero) is
accepted for GPUs without bfloat16, **with this note**: it runs without loss scaling by default, so
gradients that small are lost; the loop's finiteness check stops a run that overflows (a
``NonFiniteError`` naming the step). A static loss scale ``S`` (``--config.loss_scale``, a power of
two) is available, but only for methods **without a meta step**: it is applied inside the networks
(so every such method gets it without doing anything) as :func:`scale_gradient` on each network
output (value unchanged, derivative ``S``: the cotangents entering the float16 layers are ``S`` times
larger) and ``scale_gradient(., 1/S)`` on each parameter and input before its cast (the float32
gradients coming out are unscaled again). That is exact for first derivatives, but it is not a change
of the function: a derivative of second order in the parameters (a Hessian-vector product, a
several-step unroll) comes out divided by ``S``, and MAXL's one-step meta-gradient, exact in exact
arithmetic, runs its second backward pass ``S`` times *smaller* in float16. Scaling the loss instead
(``grad(S * L) / S``) would be exact at every order but is each method's own code, not the networks'.
So ``Method`` refuses ``loss_scale != 1`` for a method with a meta step; for those use bfloat16.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

#: ``--config.dtype`` values and the dtypes they name.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str | Any):
    """The jnp dtype of ``name`` (one of :data:`DTYPES`; a dtype is returned as it is), or ``None``
    for float32: full precision, where nothing is cast and the networks compute in their parameters'
    dtype (float32; float64 when a user or a test runs them with float64 parameters under
    ``jax_enable_x64``, which a cast to float32 would silently undo)."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {tuple(DTYPES)}")
        dt = DTYPES[name]
    else:
        dt = jnp.dtype(name).type if name is not None else jnp.float32
    return None if dt is jnp.float32 else dt


def resolve_loss_scale(dtype, loss_scale: float | None) -> float:
    """``loss_scale``, or 1 (no scaling) when it is 0 or ``None``. ``dtype`` is accepted for the
    record: the scale is the user's choice for any dtype (meant for float16)."""
    del dtype
    return float(loss_scale) if loss_scale else 1.0


def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
    """``x`` unchanged, with every derivative through it multiplied by ``scale``.

    ``stop_gradient(x) + scale * (x - stop_gradient(x))``: the value is exactly ``x`` (finite ``x``)
    and the derivative exactly ``scale`` times the incoming one when ``scale`` is a power of two.
    Written with ``stop_gradient`` rather than a custom rule, so forward mode, reverse mode and every
    composition of them (the meta-gradient's second order) see it.
    """
    if scale == 1:
        return x
    fixed = jax.lax.stop_gradient(x)
    return fixed + scale * (x - fixed)


def cast_in(x: jax.Array, dtype, loss_scale: float = 1.0) -> jax.Array:
    """A float32 parameter or input taken to the compute ``dtype`` for one use (``None``: left in
    its own dtype); its gradient comes back float32 and divided by ``loss_scale`` (undoing
    :func:`cast_out`'s scaling)."""
    x = scale_gradient(x, 1.0 / loss_scale)
    return x if dtype is None else x.astype(dtype)


def cast_out(y: jax.Array, loss_scale: float = 1.0) -> jax.Array:
    """A network output taken to float32 (or kept in float64); cotangents flowing back into the network are multiplied by
    ``loss_scale`` (in float32, before they are rounded to the compute dtype)."""
    return scale_gradient(y.astype(jnp.promote_types(y.dtype, jnp.float32)), loss_scale)

"""3x3 SAME (stride 1, padding 1) convolution that avoids XLA:CPU's slow convolution cases.

XLA:CPU's convolution is pathologically slow for some of CIFAR VGG-16's layers: the 2x2x512
layers of the last block (forward *and* gradients), the kernel gradient of the 32x32x64 layer, and
the second derivatives of every layer (see ``docs/perf-notes.md``, ``benchmarks/conv_layers.py``).
The same function written with matrix products instead runs at matmul speed, and, being made of
pads, slices, concatenations and dots only, it stays matmul-only in every derivative order (MAXL differentiates through a gradient
step, so second derivatives of the convolution are on its hot path).

Implementations (all compute exactly ``lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)))``
in NHWC / HWIO, up to float rounding):

* ``"xla"``: ``lax.conv_general_dilated``.
* ``"shifted_matmul"``: zero-pad the input by 1, then sum nine matrix products, one per kernel tap
  ``(dy, dx)``: ``y = sum_{dy,dx} xpad[:, dy:dy+H, dx:dx+W, :] @ k[dy, dx]``.
* ``"patches"``: im2col: concatenate the nine shifted views along channels, ``(N*H*W, 9*Cin)``,
  and multiply once by the kernel reshaped to ``(9*Cin, Cout)``.
* ``"hybrid"``: the forward convolution and its kernel gradient are each given their derivatives
  by ``jax.custom_vjp`` in terms of one another (see the rules above ``_conv_hybrid``), so every
  derivative order is made of two operations in their canonical layouts, never of XLA's
  transposed convolutions; each is computed by whichever form is fast at its shape: XLA's
  convolution from 4x4 and 16 input channels up, else ``"patches"``; the kernel gradient by XLA's
  kernel-transposed convolution (fast at every VGG-16 shape). Reverse mode only (``jax.grad``,
  ``jax.vjp``, any order); for ``jax.jvp`` use another form or :func:`forward_mode`.
* ``"auto"``: ``"xla"`` on accelerators (``jax.default_backend() != "cpu"`` at trace time);
  on the CPU ``"hybrid"`` for layers with at least ``HYBRID_MIN_CHANNELS`` (128) input channels
  and ``"patches"`` for the others, and ``"patches"`` everywhere inside :func:`forward_mode`
  (:func:`select_impl`).

Why this split on the CPU (since 2026-12; 2-core AVX-512 machine, jax 0.10.2; interleaved A/B of
the whole VGG-16 MAXL steps at batch 100, ``python -m benchmarks.ab_steps``, files
``benchmarks/results/conv_hybrid_*.md`` and ``conv_auto_*.md``): ``"hybrid"`` everywhere made the
theta2 (meta) step 12-22% faster than ``"patches"`` with half the memory (no 9x im2col copy kept
for the backward pass), but the theta1 step 5-7% slower, and on the small CNN (32-128 channels)
both steps 8-15% slower. ``"hybrid"`` only from 128 input channels up (VGG-16's last ten layers)
was the fastest theta2 (8641 ms against 12651 for ``"patches"`` and 9060 for ``"hybrid"``
everywhere; PyTorch 7534: 0.90x against 0.64x) with theta1 within the noise of ``"patches"`` (2690
against 2532 ms, 0.73x and 0.75x PyTorch). The small CNN keeps
``"patches"``. XLA's first-order convolution is fast on that machine except at 2x2 (1000 ms for
13 ms), while its second derivatives are 2.5-3.5x slower than ``"patches"`` at every layer:
``"hybrid"`` never takes them.

Why ``"patches"`` was the CPU choice before (the table below, on an older 2-core machine): MAXL's time goes to differentiated convolutions (each
theta1 step is a forward + backward, each theta2 step adds second derivatives). For forward +
backward ``"patches"`` is the fastest form or within about 20% of the fastest (16x16x128) on every
layer, and for second derivatives it is about 3x faster than XLA on every layer ("2nd order":
gradient w.r.t. input and kernel of a loss taken at ``kernel - lr * dL/dkernel``, as in MAXL's meta
step). Measured with ``python -m benchmarks.conv_layers --second-order`` (batch 100, 2-core CPU shared with other jobs,
jax 0.10.2, ms, median of 3; trust the ratios, not the absolute numbers):

=================  =====================  =====================  ========================
layer (x count)    forward                forward + backward     2nd order (meta step)
                   xla / shifted / patch  xla / shifted / patch  xla / shifted / patch
=================  =====================  =====================  ========================
32x32, 3->64 x1      19 /  176 /  50        77 /  238 /   54       235 /  404 /  140
32x32, 64->64 x1    208 /  455 / 521      2096 /  952 /  941      8772 / 2417 / 2092
16x16, 64->128 x1    55 /  105 / 112       211 /  186 /  159      1289 /  410 /  381
16x16, 128->128 x1   87 /  150 / 267       302 /  293 /  377      2549 /  851 /  857
8x8, 128->256 x1     42 /   62 /  71       124 /  136 /  130      1021 /  341 /  319
8x8, 256->256 x2    142 /  158 / 227       449 /  442 /  450      3723 / 1203 / 1223
4x4, 256->512 x1    119 /  100 / 136       368 /  294 /  294      2772 /  976 /  916
4x4, 512->512 x2    200 /  196 / 185       557 /  482 /  512      4907 / 1650 / 1509
2x2, 512->512 x3   4078 /   47 /  56      8060 /  137 /  130     16003 /  533 /  326
VGG-16 (13 convs)  13448 / 1895 / 2150   29371 / 4358 / 4271     81906 / 12703 / 11145
=================  =====================  =====================  ========================

XLA:CPU's convolution is pathological at 2x2 (forward and both gradients), in the kernel gradient at
32x32x64, and in every second derivative (3x slower than "patches" at every layer). Its forward
alone is 1.5-3x faster than "patches" at 8x8..32x32; pass ``impl="xla"`` explicitly for
forward-only (evaluation) use on the CPU if that matters: parameters are identical for all impls.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from maxl_jax import precision as precision_lib

IMPLS = ("xla", "shifted_matmul", "patches", "hybrid", "auto")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


# "auto" takes "hybrid" on the CPU for layers with at least this many input channels ("patches" for
# the others): measured faster so on VGG-16, slower on the small CNN's 32-64-channel layers
HYBRID_MIN_CHANNELS = 128

_STATE = threading.local()  # .forward_mode: inside forward_mode() while a function is traced


@contextlib.contextmanager
def forward_mode():
    """Within this context, ``impl="auto"`` picks an implementation that ``jax.jvp`` can
    differentiate (``"patches"`` on the CPU instead of ``"hybrid"``).

    ``"hybrid"`` defines its derivatives with ``jax.custom_vjp``, so it supports reverse mode
    (``jax.grad``, ``jax.vjp``, to any order) but not forward mode: JAX raises "can't apply
    forward-mode autodiff (jvp) to a custom_vjp function". Trace a function that uses forward mode
    through these convolutions (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) inside this context,
    or pass ``impl="patches"``; ``maxl_jax.meta``'s ``forward_over_reverse`` form does it for you.
    It acts when the function is traced (the first call of a ``jax.jit``-compiled function), and
    is per thread.
    """
    before = getattr(_STATE, "forward_mode", False)
    _STATE.forward_mode = True
    try:
        yield
    finally:
        _STATE.forward_mode = before


def select_impl(x_shape, kernel_shape, backend: str | None = None) -> str:
    """The implementation ``impl="auto"`` uses for an NHWC input / HWIO kernel of these shapes.

    ``"xla"`` unless the backend (default ``jax.default_backend()``) is the CPU, where it is
    ``"hybrid"`` (``"patches"`` inside :func:`forward_mode`), which itself picks XLA's convolution
    or the im2col matmul by shape at every derivative order (see the module docstring).
    """
    del x_shape
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return "xla"
    if getattr(_STATE, "forward_mode", False) or kernel_shape[2] < HYBRID_MIN_CHANNELS:
        return "patches"
    return "hybrid"


def _pad1(x):
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _conv_xla(x, kernel, precision):
    return lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                    dimension_numbers=_DIMENSION_NUMBERS, precision=precision)


def _matmul(a, b, precision):
    """(N, H, W, C) @ (C, O) -> (N, H, W, O) as one 2-D matrix product."""
    n, h, w, c = a.shape
    y = jnp.matmul(a.reshape(n * h * w, c), b, precision=precision)
    return y.reshape(n, h, w, b.shape[-1])


def _conv_shifted_matmul(x, kernel, precision):
    _, h, w, _ = x.shape
    xp = _pad1(x)
    y = None
    for dy in range(3):
        for dx in range(3):
            t = _matmul(xp[:, dy:dy + h, dx:dx + w, :], kernel[dy, dx], precision)
            y = t if y is None else y + t
    return y


def _conv_patches(x, kernel, precision):
    _, h, w, cin = x.shape
    xp = _pad1(x)
    # channel index of the patch = (dy * 3 + dx) * Cin + c, the row-major order of HWIO's (3,3,Cin)
    cols = jnp.concatenate([xp[:, dy:dy + h, dx:dx + w, :] for dy in range(3) for dx in range(3)],
                           axis=-1)
    return _matmul(cols, kernel.reshape(9 * cin, kernel.shape[-1]), precision)


# ------------------------------------------------------------------------------ "hybrid"
# Every derivative of a 3x3 SAME convolution is again one of two canonical operations:
#   conv(x, k)      (N,H,W,Ci) x (3,3,Ci,Co) -> (N,H,W,Co)   the forward convolution
#   kgrad(x, g)     (N,H,W,Ci) x (N,H,W,Co) -> (3,3,Ci,Co)   its kernel gradient
# with  d conv / dx . g = conv(g, flip(k)),  d conv / dk . g = kgrad(x, g),
#       d kgrad / dx . G = conv(g, flip(G)), d kgrad / dg . G = conv(x, G),
# where flip(k) = k[::-1, ::-1].swapaxes(2, 3) (the transposed convolution of a stride-1 SAME 3x3
# convolution is the SAME convolution with the flipped, channel-swapped kernel). Defining both with
# these rules (jax.custom_vjp), every derivative order is made of these two operations in their
# canonical layouts, each computed by whichever of XLA's convolution and the im2col matmul is fast
# at its shape, instead of XLA's transposed convolutions, slow on the CPU at second order.


def _flip(k):
    return jnp.swapaxes(k[::-1, ::-1], 2, 3)


def _conv_fast(x, kernel, precision):
    """The forward convolution by the form that is fast at this shape on XLA:CPU."""
    _, h, w, cin = x.shape
    if min(h, w) >= 4 and cin >= 16:  # XLA's convolution; the im2col copies cost more here
        return _conv_xla(x, kernel, precision)
    return _conv_patches(x, kernel, precision)  # 2x2 (XLA pathological) and few input channels


def _kgrad_fast(x, g, precision):
    """``sum_{n,h,w} xpad[n, h+a, w+b, i] g[n, h, w, o]`` as ``(3, 3, Ci, Co)``: the transpose of
    XLA's convolution in the kernel (as fast as or faster than im2col at every VGG-16 shape, 2x2
    included; only its own derivatives are slow, and those are never taken: see the rules above)."""
    kernel = jax.ShapeDtypeStruct((3, 3, x.shape[-1], g.shape[-1]), g.dtype)
    return jax.linear_transpose(lambda k: _conv_xla(x, k, precision), kernel)(g)[0]


def _custom_vjp_op(fast, rule):
    """``op(a, b, precision) = fast(a, b, precision)`` whose VJP for the cotangent ``g`` is
    ``rule(precision, a, b, g)`` (a pair of cotangents for ``a`` and ``b``)."""
    op = jax.custom_vjp(fast, nondiff_argnums=(2,))
    op.defvjp(lambda a, b, precision: (fast(a, b, precision), (a, b)),
              lambda precision, res, g: rule(precision, *res, g))
    return op


def _conv_vjp(precision, x, kernel, g):  # d conv / dx . g,  d conv / dk . g
    return _conv_hybrid(g, _flip(kernel), precision), _kgrad_hybrid(x, g, precision)


def _kgrad_vjp(precision, x, g, gk):  # d kgrad / dx . gk,  d kgrad / dg . gk
    return _conv_hybrid(g, _flip(gk), precision), _conv_hybrid(x, gk, precision)


_conv_hybrid = _custom_vjp_op(_conv_fast, _conv_vjp)
_kgrad_hybrid = _custom_vjp_op(_kgrad_fast, _kgrad_vjp)


_FNS = {"xla": _conv_xla, "shifted_matmul": _conv_shifted_matmul, "patches": _conv_patches,
        "hybrid": _conv_hybrid}


def conv3x3(x, kernel, bias=None, *, impl: str = "auto", precision=None,
            stride: int = 1) -> jax.Array:
    """3x3 convolution, zero padding 1, NHWC input, HWIO kernel; stride 1 (SAME) by default.

    Args:
      x: ``(N, H, W, Cin)`` floating-point input.
      kernel: ``(3, 3, Cin, Cout)`` (the layout of ``flax.linen.Conv``'s ``kernel``).
      bias: optional ``(Cout,)``, added to the output.
      impl: ``"xla"``, ``"shifted_matmul"``, ``"patches"``, ``"hybrid"`` or ``"auto"`` (module
        docstring).
      precision: passed to the convolution / matrix products (``lax.Precision``), as in ``nn.Conv``.
      stride: the spatial stride (ResNet's downsampling convolutions take 2). ``"xla"`` passes it to
        ``lax.conv_general_dilated``; the other forms compute the stride-1 output and keep every
        ``stride``-th row and column, which is the same function (output ``(i, j)`` of a strided
        convolution with padding 1 is the stride-1 output at ``(stride i, stride j)``), so every
        derivative order stays in the form's own operations (at ``stride**2`` times the work of
        the strided layer).

    Returns:
      ``(N, ceil(H / stride), ceil(W / stride), Cout)``; inputs of different dtypes are promoted
      to their common dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (4-D), got shape {x.shape}")
    if kernel.shape[:2] != (3, 3) or kernel.ndim != 4 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"kernel must be (3, 3, {x.shape[-1]}, Cout), got {kernel.shape}")
    dtype = jnp.result_type(x, kernel) if bias is None else jnp.result_type(x, kernel, bias)
    x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    if impl == "auto":
        impl = select_impl(x.shape, kernel.shape)
    if impl == "xla" and stride > 1:
        y = lax.conv_general_dilated(x, kernel, window_strides=(stride, stride),
                                     padding=((1, 1), (1, 1)),
                                     dimension_numbers=_DIMENSION_NUMBERS, precision=precision)
    else:
        y = _FNS[impl](x, kernel, precision)
        if stride > 1:
            y = y[:, ::stride, ::stride]
    if bias is not None:
        y = y + jnp.asarray(bias, dtype)
    return y


class Conv3x3(nn.Module):
    """Drop-in replacement for ``nn.Conv(features, (3, 3), strides=stride, padding=1)`` using
    :func:`conv3x3`.

    Parameters are named and shaped exactly like ``nn.Conv``'s (``kernel`` ``(3, 3, Cin,
    features)``, ``bias`` ``(features,)``), so parameter trees and checkpoints interchange.
    Input: ``(N, H, W, Cin)`` (exactly one batch axis).

    ``dtype``: the computation dtype; ``None`` promotes the input and the parameters to their common
    dtype (as ``nn.Conv``); given, the input and the (``param_dtype``) parameters are cast to it at use
    through ``precision.cast_in``, whose gradient is divided by ``loss_scale`` (float16's static loss
    scale, see ``maxl_jax.precision``; 1 otherwise).
    """

    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    use_bias: bool = True
    impl: str = "auto"
    stride: int = 1
    dtype: Any = None  # computation dtype (None: promote inputs and params, like nn.Conv)
    param_dtype: Any = jnp.float32
    precision: Any = None
    loss_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        if self.dtype is None:
            x, kernel, bias = promote_dtype(x, kernel, bias, dtype=None)
        else:
            x = x.astype(self.dtype)
            kernel = precision_lib.cast_in(kernel, self.dtype, self.loss_scale)
            bias = None if bias is None else precision_lib.cast_in(bias, self.dtype,
                                                                   self.loss_scale)
        return conv3x3(x, kernel, bias, impl=self.impl, precision=self.precision,
                       stride=self.stride)

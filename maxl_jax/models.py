"""MAXL's two networks as Flax Linen modules, used through pure ``apply`` functions.

* ``MultiTaskNet`` f(theta1): a backbone shared by a primary head (``num_primary`` classes) and an
  auxiliary head (``num_auxiliary`` classes); each head is ``Dense(width) - ReLU - Dense(K)``.
* ``LabelGenerator`` g(theta2): a separate backbone with one ``Dense(width) - ReLU - Dense(sum(psi))``
  head. It returns logits; the mask softmax (``losses.mask_softmax``) turns them into soft labels.

Both return logits (the reference's heads end in softmax; the losses apply it in log space).
Variables: ``{'params': ..., 'batch_stats': ...}``. Call with ``train=True`` and
``mutable=['batch_stats']`` to use batch statistics and get updated running statistics.

Backbones: the reference CIFAR VGG-16-BN (``vgg16``) and a small CNN for 2-core CPUs (``small``).
Initialisation follows the reference: Xavier-uniform weights in f, Xavier-normal in g, zero biases,
BatchNorm scale 1 and bias 0.

Precision (``dtype``, ``loss_scale``; see ``maxl_jax.precision``): parameters are always float32 and
cast to ``dtype`` at each use; convolutions, dense layers, ReLUs and max-pools compute in ``dtype``;
BatchNorm computes its statistics and normalisation in float32; the logits leave each network as
float32, so every loss, softmax and log-softmax downstream is float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxl_jax import precision
from maxl_jax.conv import Conv3x3

Initializer = Callable[..., jax.Array]


def xavier(distribution: str) -> Initializer:
    """PyTorch's ``xavier_uniform_`` / ``xavier_normal_`` (a plain, untruncated normal).

    ``std = sqrt(2 / (fan_in + fan_out))`` with fans counting the receptive field (HWIO kernels,
    ``(in, out)`` dense kernels). The numbers are drawn as a flat vector and reshaped: with jax's
    default ``jax_threefry_partitionable``, XLA:CPU compiles threefry for an N-d shape about 10x
    slower than for a 1-d one (8.2 s vs 0.8 s for a 3x3x4x8 kernel on 2 cores, jax 0.10.2).
    """
    if distribution not in ("uniform", "normal"):
        raise ValueError(f"distribution must be 'uniform' or 'normal', got {distribution!r}")

    def init(key, shape, dtype=jnp.float32):
        receptive = math.prod(shape[:-2])
        std = math.sqrt(2.0 / (shape[-2] * receptive + shape[-1] * receptive))
        n = math.prod(shape)
        if distribution == "uniform":
            bound = math.sqrt(3.0) * std
            flat = jax.random.uniform(key, (n,), dtype, -bound, bound)
        else:
            flat = jax.random.normal(key, (n,), dtype) * std
        return flat.reshape(shape)

    return init


# Reference initialisers: Xavier-uniform in f, Xavier-normal in g.
XAVIER_UNIFORM = xavier("uniform")
XAVIER_NORMAL = xavier("normal")

VGG16_FILTERS = (64, 128, 256, 512, 512)
VGG16_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
SMALL_FILTERS = (32, 64, 128)
SMALL_CONVS_PER_BLOCK = (1, 1, 1)


class BatchNorm(nn.Module):
    """BatchNorm over all but the last axis, as PyTorch's ``BatchNorm2d`` computes it.

    ``momentum`` follows Flax's convention (PyTorch's 0.1 is 0.9 here); the running variance is updated
    with the unbiased batch variance, as PyTorch does. With ``axis_name`` the batch statistics are taken
    over all devices of that axis (synchronised BatchNorm), so a sharded batch matches one device.
    With ``mask`` (``(B,)``, 0 for padding examples) the statistics are those of the real examples
    alone, so a batch padded to a multiple of the device count gives the unpadded batch's numbers.

    Precision: whatever the input's dtype, the statistics, the normalisation and the running
    statistics are float32 (the input is cast up first); the output is cast back to the input's
    dtype. ``loss_scale``: see ``maxl_jax.precision`` (the float32 scale and bias are used through
    ``precision.cast_in`` so their gradients are unscaled like every other parameter's).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    loss_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, axis_name: str | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        features = x.shape[-1]
        out_dtype = x.dtype
        up = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 under x64
        x = x.astype(up)
        scale = precision.cast_in(self.param("scale", nn.initializers.ones, (features,)),
                                  up, self.loss_scale)
        bias = precision.cast_in(self.param("bias", nn.initializers.zeros, (features,)),
                                 up, self.loss_scale)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if train and mask is not None:
            mean, var, count = _masked_moments(x, mask, axis_name)
        elif train:
            axes = tuple(range(x.ndim - 1))
            count = x.size // features
            mean = jnp.mean(x, axes)
            if axis_name is not None:
                mean = jax.lax.pmean(mean, axis_name)
                count = count * jax.lax.psum(1, axis_name)
            var = jnp.mean(jnp.square(x - mean), axes)
            if axis_name is not None:
                var = jax.lax.pmean(var, axis_name)
        if train:
            if not self.is_initializing():
                m = self.momentum
                bessel = (count / jnp.maximum(count - 1, 1) if isinstance(count, jax.Array)
                          else count / max(count - 1, 1))
                unbiased = jax.lax.stop_gradient(var) * bessel
                ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
                ra_var.value = m * ra_var.value + (1 - m) * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        return ((x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(out_dtype)


def _masked_moments(x: jax.Array, mask: jax.Array, axis_name: str | None):
    """Mean and (biased) variance over all but the last axis of the examples with ``mask`` 1, and
    their count (examples x positions)."""
    axes = tuple(range(x.ndim - 1))
    m = mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    count = jnp.sum(mask.astype(x.dtype)) * (x.size // (x.shape[0] * x.shape[-1]))
    total = jnp.sum(x * m, axes)
    if axis_name is not None:
        count, total = jax.lax.psum((count, total), axis_name)
    mean = total / count
    squares = jnp.sum(jnp.square(x - mean) * m, axes)
    if axis_name is not None:
        squares = jax.lax.psum(squares, axis_name)
    return mean, squares / count, count


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 (``nn.max_pool(x, (2, 2), strides=(2, 2))``; odd trailing rows
    and columns dropped, as there), written as a reshape and elementwise maxima of the window's rows,
    then columns.

    The forward is bit-identical to ``nn.max_pool``. The backward differs only where a window's maximum
    is tied: ``jnp.maximum`` splits the gradient evenly between tied entries where ``nn.max_pool``'s
    ``select_and_scatter_add`` (and PyTorch) give it all to one. In the backbone the pool follows a
    ReLU, so the only ties of non-zero probability are windows of zeros, whose pre-activations are
    <= 0 and get no gradient through the ReLU either way: the networks' gradients are unchanged
    (tested against ``nn.max_pool`` here, and against PyTorch in ``tests/test_torch_parity``).

    Why: XLA:CPU lowers ``select_and_scatter_add`` to an iota, a variadic (value, index) reduce-window
    and a scatter, ~20% of the small CNN's step time; this form's backward is a compare-and-select.
    At VGG-16's five pooled sizes, batch 100, 2 CPU cores: gradient 2.3-3.5x and Hessian-vector
    product 1.9-2.9x faster than ``nn.max_pool`` (``python -m benchmarks.pool_layers``). (A
    ``reshape(...).max(axis=(2, 4))`` is as fast, but XLA:CPU at ``xla_backend_optimization_level=0``
    miscompiles the meta-gradient through its JVP rule into NaNs; this form is exact at every level.)
    """
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
    rows = jnp.maximum(x[:, :, 0], x[:, :, 1])  # (b, h/2, w/2, 2, c)
    return jnp.maximum(rows[:, :, :, 0], rows[:, :, :, 1])


class ConvBackbone(nn.Module):
    """VGG-style backbone: blocks of [3x3 conv (padding 1) - BN - ReLU] x n, then 2x2 max-pool.

    ``filters=(64,128,256,512,512)``, ``convs_per_block=(2,2,3,3,3)`` is the reference CIFAR VGG-16-BN
    (32x32x3 -> 1x1x512 -> flatten). With ``global_pool`` the last feature map is averaged over space,
    so any input size works (the small CNN accepts 28x28x1 and 32x32x3).

    Input ``(B, H, W, C)`` float; output ``(B, features)`` in ``dtype`` (the compute dtype: the
    input is cast to it first; ``loss_scale`` as in ``maxl_jax.precision``).
    """

    filters: Sequence[int] = VGG16_FILTERS
    convs_per_block: Sequence[int] = VGG16_CONVS_PER_BLOCK
    global_pool: bool = False
    kernel_init: Initializer = XAVIER_UNIFORM
    conv_impl: str = "auto"
    dtype: Any = None  # the compute dtype; None: the parameters' (no casts)
    loss_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, axis_name: str | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (batch, height, width, channels), got {x.shape}")
        blocks = len(self.filters)
        if not self.global_pool and min(x.shape[1:3]) < 2 ** blocks:
            raise ValueError(
                f"images of {x.shape[1]}x{x.shape[2]} pixels shrink to nothing through this "
                f"backbone's {blocks} 2x2 max-pools (it flattens its last feature map): it needs at "
                f"least {2 ** blocks}x{2 ** blocks} (pad the images, e.g. Fashion-MNIST's 28x28 to "
                f"32x32, or use a backbone with global pooling such as arch='small')")
        x = precision.cast_in(x, self.dtype, self.loss_scale)
        layer = 0
        for features, n_convs in zip(self.filters, self.convs_per_block):
            for _ in range(n_convs):
                x = Conv3x3(features, kernel_init=self.kernel_init, impl=self.conv_impl,
                            dtype=self.dtype, loss_scale=self.loss_scale, name=f"conv_{layer}")(x)
                x = BatchNorm(loss_scale=self.loss_scale, name=f"bn_{layer}")(x, train, axis_name,
                                                                              mask)
                x = nn.relu(x)
                layer += 1
            x = max_pool_2x2(x)
        if self.global_pool:  # the spatial mean accumulated in float32
            return jnp.mean(x, axis=(1, 2),
                            dtype=jnp.promote_types(x.dtype, jnp.float32)).astype(x.dtype)
        return x.reshape(x.shape[0], -1)


class Dense(nn.Module):
    """``nn.Dense`` (same parameter names and shapes: ``kernel (in, features)``, ``bias``) with
    float32 parameters cast to the compute ``dtype`` at use through ``precision.cast_in``."""

    features: int
    kernel_init: Initializer = XAVIER_UNIFORM
    dtype: Any = None  # the compute dtype; None: the parameters' (no casts)
    loss_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        kernel = precision.cast_in(kernel, self.dtype, self.loss_scale)
        bias = precision.cast_in(bias, self.dtype, self.loss_scale)
        return jnp.dot(x if self.dtype is None else x.astype(self.dtype), kernel) + bias


class Head(nn.Module):
    """``Dense(width) - ReLU - Dense(num_classes)`` in ``dtype``, returning float32 logits
    (``precision.cast_out``: the losses downstream are float32)."""

    width: int
    num_classes: int
    kernel_init: Initializer = XAVIER_UNIFORM
    dtype: Any = None  # the compute dtype; None: the parameters' (no casts)
    loss_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = dict(kernel_init=self.kernel_init, dtype=self.dtype, loss_scale=self.loss_scale)
        x = nn.relu(Dense(self.width, **dense, name="hidden")(x))
        return precision.cast_out(Dense(self.num_classes, **dense, name="out")(x), self.loss_scale)


class MultiTaskNet(nn.Module):
    """f(theta1): shared backbone, primary head and auxiliary head. Returns ``(primary, auxiliary)``
    logits of shapes ``(B, num_primary)`` and ``(B, num_auxiliary)``."""

    num_primary: int
    num_auxiliary: int
    backbone: ConvBackbone
    head_width: int = 512
    kernel_init: Initializer = XAVIER_UNIFORM

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, axis_name: str | None = None,
                 mask: jax.Array | None = None):
        h = self.backbone(x, train, axis_name, mask)
        prec = dict(dtype=self.backbone.dtype, loss_scale=self.backbone.loss_scale)
        primary = Head(self.head_width, self.num_primary, self.kernel_init, **prec,
                       name="primary_head")(h)
        auxiliary = Head(self.head_width, self.num_auxiliary, self.kernel_init, **prec,
                         name="auxiliary_head")(h)
        return primary, auxiliary


class LabelGenerator(nn.Module):
    """g(theta2): its own backbone and one head; returns auxiliary logits ``(B, num_auxiliary)``.

    The true primary label enters only through the mask softmax applied to these logits. With
    ``weight_head`` (WAMAL) a second ``Dense(width) - ReLU - Dense(1)`` head on the same features
    also returns one weight logit per example: the output is then ``(logits, weight_logits (B,))``.
    """

    num_auxiliary: int
    backbone: ConvBackbone
    head_width: int = 512
    kernel_init: Initializer = XAVIER_NORMAL
    weight_head: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, axis_name: str | None = None,
                 mask: jax.Array | None = None):
        h = self.backbone(x, train, axis_name, mask)
        prec = dict(dtype=self.backbone.dtype, loss_scale=self.backbone.loss_scale)
        logits = Head(self.head_width, self.num_auxiliary, self.kernel_init, **prec, name="head")(h)
        if not self.weight_head:
            return logits
        weight = Head(self.head_width, 1, self.kernel_init, **prec, name="weight_head")(h)
        return logits, weight[:, 0]


ARCHITECTURES = ("vgg16", "small")


def make_backbone(arch: str, kernel_init: Initializer, conv_impl: str = "auto",
                  width: int | None = None, dtype: Any = "float32",
                  loss_scale: float | None = None) -> ConvBackbone:
    """``arch='vgg16'`` (reference CIFAR VGG-16-BN) or ``'small'`` (3 conv blocks, global pooling;
    ``width`` scales its first block's filters, default 32 -> filters (32, 64, 128)).

    ``dtype``: the compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); ``loss_scale``: the
    static loss scale (``None`` or 0: 1, none; see ``maxl_jax.precision``)."""
    dt = precision.compute_dtype(dtype)
    prec = dict(dtype=dt, loss_scale=precision.resolve_loss_scale(dt, loss_scale))
    if arch == "vgg16":
        return ConvBackbone(VGG16_FILTERS, VGG16_CONVS_PER_BLOCK, False, kernel_init, conv_impl,
                            **prec)
    if arch == "small":
        w = width or SMALL_FILTERS[0]
        filters = tuple(w * 2 ** i for i in range(len(SMALL_FILTERS)))
        return ConvBackbone(filters, SMALL_CONVS_PER_BLOCK, True, kernel_init, conv_impl, **prec)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


def make_networks(arch: str, num_primary: int, num_auxiliary: int, generator_classes: int,
                  *, conv_impl: str = "auto", width: int | None = None,
                  head_width: int | None = None, generator_weight_head: bool = False,
                  dtype: Any = "float32",
                  loss_scale: float | None = None) -> tuple[MultiTaskNet, LabelGenerator]:
    """The multi-task network and the label generator with the reference's initialisation.

    ``num_auxiliary`` is the multi-task network's auxiliary head size (``sum(psi)``, or the number of
    fine classes for the human auxiliary task); ``generator_classes`` is ``sum(psi)``. ``head_width``
    defaults to 512 for VGG-16 and to the backbone's output width for the small CNN.
    ``generator_weight_head`` adds WAMAL's per-example weight head to the generator. ``dtype`` and
    ``loss_scale``: both networks' compute precision (``maxl_jax.precision``; parameters stay
    float32 and the logits come out float32).
    """
    for name, value, low in (("num_primary", num_primary, 1), ("num_auxiliary", num_auxiliary, 0),
                             ("generator_classes", generator_classes, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"make_networks: {name}={value!r} must be an integer >= {low} (the "
                             f"number of {'primary classes' if low else 'classes of that head'})")
    f_backbone = make_backbone(arch, XAVIER_UNIFORM, conv_impl, width, dtype, loss_scale)
    g_backbone = make_backbone(arch, XAVIER_NORMAL, conv_impl, width, dtype, loss_scale)
    if head_width is None:
        head_width = 512 if arch == "vgg16" else f_backbone.filters[-1]
    multitask = MultiTaskNet(num_primary, num_auxiliary, f_backbone, head_width, XAVIER_UNIFORM)
    generator = LabelGenerator(generator_classes, g_backbone, head_width, XAVIER_NORMAL,
                               generator_weight_head)
    return multitask, generator


def count_params(params) -> int:
    """Number of scalars in a params pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))

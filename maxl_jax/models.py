"""MAXL's two networks as Flax Linen modules, used through pure ``apply`` functions.

* ``MultiTaskNet`` f(theta1): a backbone shared by a primary head (``num_primary`` classes) and an
  auxiliary head (``num_auxiliary`` classes); each head is ``Dense(width) - ReLU - Dense(K)``.
* ``LabelGenerator`` g(theta2): a separate backbone with one ``Dense(width) - ReLU - Dense(sum(psi))``
  head. It returns logits; the mask softmax (``losses.mask_softmax``) turns them into soft labels.

Both return logits (the reference's heads end in softmax; the losses apply it in log space).
Variables: ``{'params': ..., 'batch_stats': ...}``. Call with ``train=True`` and
``mutable=['batch_stats']`` to use batch statistics and get updated running statistics.

Backbones: the reference CIFAR VGG-16-BN (``vgg16``), the CIFAR ResNet-18 (``resnet18``) and a
small CNN for 2-core CPUs (``small``); or any Flax module of your own (``make_networks(arch=Factory)``,
``--config.arch=package.module:Factory``; its contract: ``CustomBackbone``).
Initialisation follows the reference: Xavier-uniform weights in f, Xavier-normal in g, zero biases,
BatchNorm scale 1 and bias 0 (a backbone of your own keeps its own initialisers).

Precision (``dtype``, ``loss_scale``; see ``maxl_jax.precision``): parameters are always float32 and
cast to ``dtype`` at each use; convolutions, dense layers, ReLUs and max-pools compute in ``dtype``;
BatchNorm computes its statistics and normalisation in float32; the logits leave each network as
float32, so every loss, softmax and log-softmax downstream is float32.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxl_jax import precision, validation
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
RESNET18_FILTERS = (64, 128, 256, 512)
RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET18_STRIDES = (1, 2, 2, 2)


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
                f"32x32, or use a backbone with global pooling such as arch='small' or 'resnet18')")
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


def _global_mean(x: jax.Array) -> jax.Array:
    """The spatial mean of a ``(B, H, W, C)`` feature map, accumulated in float32 (or float64),
    returned in the map's dtype."""
    return jnp.mean(x, axis=(1, 2), dtype=jnp.promote_types(x.dtype, jnp.float32)).astype(x.dtype)


class Conv1x1(nn.Module):
    """A 1x1 convolution without bias and with stride ``stride`` (ResNet's projection shortcut):
    ``nn.Conv(features, (1, 1), strides=stride, use_bias=False)``, its ``kernel`` ``(1, 1, Cin,
    features)`` named and shaped as there, computed as every ``stride``-th row and column of the
    input times the ``(Cin, features)`` matrix (a matrix product in every derivative order).
    Precision as ``Dense``."""

    features: int
    stride: int = 1
    kernel_init: Initializer = XAVIER_UNIFORM
    dtype: Any = None  # the compute dtype; None: the parameters' (no casts)
    loss_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                            jnp.float32)
        kernel = precision.cast_in(kernel, self.dtype, self.loss_scale)
        x = x[:, ::self.stride, ::self.stride]
        return jnp.dot(x if self.dtype is None else x.astype(self.dtype), kernel[0, 0])


class BasicBlock(nn.Module):
    """ResNet's basic block: ``3x3 conv (stride) - BN - ReLU - 3x3 conv - BN``, plus the shortcut,
    then ReLU. The shortcut is the identity, or, where the block changes the shape (``stride > 1``
    or other channels), a ``1x1 conv (stride) - BN`` projection. Convolutions have no bias (the
    BatchNorm after each has one). Layers: ``conv_0, bn_0, conv_1, bn_1`` and, projecting,
    ``shortcut_conv, shortcut_bn``."""

    features: int
    stride: int = 1
    kernel_init: Initializer = XAVIER_UNIFORM
    conv_impl: str = "auto"
    dtype: Any = None
    loss_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, axis_name: str | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        conv = dict(kernel_init=self.kernel_init, impl=self.conv_impl, dtype=self.dtype,
                    loss_scale=self.loss_scale, use_bias=False)

        def bn(y, name):
            return BatchNorm(loss_scale=self.loss_scale, name=name)(y, train, axis_name, mask)

        y = Conv3x3(self.features, stride=self.stride, **conv, name="conv_0")(x)
        y = nn.relu(bn(y, "bn_0"))
        y = bn(Conv3x3(self.features, **conv, name="conv_1")(y), "bn_1")
        if self.stride != 1 or x.shape[-1] != self.features:
            x = Conv1x1(self.features, self.stride, self.kernel_init, self.dtype, self.loss_scale,
                        name="shortcut_conv")(x)
            x = bn(x, "shortcut_bn")
        return nn.relu(y + x)


class ResNetStem(nn.Module):
    """The CIFAR ResNet stem: ``3x3 conv (stride 1, no bias) - BN - ReLU``, no max-pool."""

    features: int
    kernel_init: Initializer = XAVIER_UNIFORM
    conv_impl: str = "auto"
    dtype: Any = None
    loss_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, axis_name: str | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        x = Conv3x3(self.features, kernel_init=self.kernel_init, impl=self.conv_impl,
                    dtype=self.dtype, loss_scale=self.loss_scale, use_bias=False, name="conv")(x)
        return nn.relu(BatchNorm(loss_scale=self.loss_scale, name="bn")(x, train, axis_name, mask))


class ResNetStage(nn.Module):
    """``blocks`` basic blocks of ``features`` channels (``block1``, ``block2``, ...); the first
    has stride ``stride``."""

    features: int
    blocks: int
    stride: int
    kernel_init: Initializer = XAVIER_UNIFORM
    conv_impl: str = "auto"
    dtype: Any = None
    loss_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, axis_name: str | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        for b in range(self.blocks):
            x = BasicBlock(self.features, self.stride if b == 0 else 1, self.kernel_init,
                           self.conv_impl, self.dtype, self.loss_scale,
                           name=f"block{b + 1}")(x, train, axis_name, mask)
        return x


class ResNetBackbone(nn.Module):
    """The CIFAR ResNet (He et al. 2016, as in the widely used ``kuangliu/pytorch-cifar``):
    a 3x3 stem conv of ``filters[0]`` channels, stride 1, no max-pool; then stages of
    ``blocks_per_stage`` basic blocks (``BasicBlock``) of ``filters`` channels, the first block of
    each stage with ``strides``; global average pooling. The defaults are ResNet-18:
    ``filters=(64, 128, 256, 512)``, two blocks per stage, strides ``(1, 2, 2, 2)``:
    32x32x3 -> 4x4x512 -> 512 features, 11,168,832 parameters (BatchNorm scale and bias
    included; the 10-class fc of the usual count, 5,130, is replaced by the method's heads).

    Parameters: ``stem/{conv,bn}``, ``stage<s>/block<b>/{conv_0,bn_0,conv_1,bn_1}`` and, where a
    block changes shape, ``stage<s>/block1/{shortcut_conv,shortcut_bn}``; ``module_names`` lists
    the top-level ones in network order (MAOAL's ``"blocks"`` modules). Input ``(B, H, W, C)``
    float, any size; output ``(B, filters[-1])`` in ``dtype`` (precision as ``ConvBackbone``).
    """

    filters: Sequence[int] = RESNET18_FILTERS
    blocks_per_stage: Sequence[int] = RESNET18_BLOCKS
    strides: Sequence[int] = RESNET18_STRIDES
    kernel_init: Initializer = XAVIER_UNIFORM
    conv_impl: str = "auto"
    dtype: Any = None  # the compute dtype; None: the parameters' (no casts)
    loss_scale: float = 1.0

    @property
    def module_names(self) -> tuple[str, ...]:
        """The top-level submodules in network order: ``("stem", "stage1", ...)``."""
        return ("stem",) + tuple(f"stage{s + 1}" for s in range(len(self.filters)))

    @property
    def features(self) -> int:
        """The output features' width."""
        return int(self.filters[-1])

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, axis_name: str | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (batch, height, width, channels), got {x.shape}")
        if not len(self.filters) == len(self.blocks_per_stage) == len(self.strides):
            raise ValueError(f"filters {tuple(self.filters)}, blocks_per_stage "
                             f"{tuple(self.blocks_per_stage)} and strides {tuple(self.strides)} "
                             f"need one entry per stage each")
        prec = dict(kernel_init=self.kernel_init, conv_impl=self.conv_impl, dtype=self.dtype,
                    loss_scale=self.loss_scale)
        x = precision.cast_in(x, self.dtype, self.loss_scale)
        x = ResNetStem(self.filters[0], **prec, name="stem")(x, train, axis_name, mask)
        for s, (features, blocks, stride) in enumerate(zip(self.filters, self.blocks_per_stage,
                                                           self.strides)):
            x = ResNetStage(features, blocks, stride, **prec, name=f"stage{s + 1}")(
                x, train, axis_name, mask)
        return _global_mean(x)


class CustomBackbone(nn.Module):
    """A Flax module of your own as the shared backbone (``make_networks(arch=...)``,
    ``--config.arch=package.module:Factory``).

    The contract for ``module`` (any ``flax.linen.Module``):

    * It is called as ``module(images, **extras)`` with ``images`` ``(B, H, W, C)`` float32, NHWC,
      normalised (mean 0.5, std 0.2 per channel, as every backbone here), of the data set's size
      (32x32x3 for CIFAR, 28x28x1 for Fashion-MNIST and EMNIST).
    * ``extras`` holds the keyword arguments its ``__call__`` names, of: ``train`` (bool: True in
      training and meta steps, where BatchNorm uses and updates batch statistics; False at
      evaluation, at initialisation and where a method uses a network's running statistics, as
      RL-AUX's policy in its primary phase); ``axis_name`` (None in the training loop, whose data
      parallelism is jit's sharding, where batch statistics are global anyway; a device axis when
      the pure steps run inside a user's ``shard_map``: synchronise BatchNorm over it, e.g. with
      ``maxl_jax.models.BatchNorm``); ``mask`` (``(B,)`` float, 0 for the padding of a batch the
      devices do not divide; ``maxl_jax.models.BatchNorm`` takes it; a module without it counts
      the padding examples in its batch statistics, only in such a padded batch).
      A module naming none of them is called with the images alone.
    * It returns features ``(B, F)``, or a feature map ``(B, H', W', F)``, averaged over space
      here. The heads (``Dense(head_width) - ReLU - Dense(K)``) are built on them; ``head_width``
      defaults to ``F``.
    * Variables: ``params``, and ``batch_stats`` for BatchNorm running statistics
      (``nn.BatchNorm(use_running_average=not train)``, or ``models.BatchNorm()(x, train)``); no
      other collection, and no random numbers at apply (no dropout): every step here is a
      deterministic function of the state. A module without BatchNorm gets an empty scalar ``batch_stats/none`` so every
      network has the collection.
    * Precision is the module's own (the networks' heads compute in float32): build a lower
      precision into it; ``--config.dtype`` and ``loss_scale`` apply to the built-in backbones.
    * Initialisation is the module's own (the built-in backbones use Xavier-uniform in f and
      Xavier-normal in g); the label generator gets a second instance from the same factory.

    ``dtype`` (None) and ``loss_scale`` (1) are read by the heads and the methods, as on the
    built-in backbones.
    """

    module: nn.Module
    dtype: Any = None
    loss_scale: float = 1.0

    @property
    def module_names(self) -> None:
        """None: MAOAL's ``"blocks"`` are the module's own top-level submodules."""
        return None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, axis_name: str | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        given = {"train": train, "axis_name": axis_name, "mask": mask}
        accepted = call_arguments(self.module)
        h = self.module(x, **{k: v for k, v in given.items() if k in accepted})
        if not hasattr(h, "ndim") or h.ndim not in (2, 4) or h.shape[0] != x.shape[0]:
            raise ValueError(
                f"the backbone {type(self.module).__name__} returned "
                f"{getattr(h, 'shape', type(h).__name__)} for images of shape {x.shape}: it must "
                f"return features (batch, features) or a feature map (batch, height, width, "
                f"features)")
        if h.ndim == 4:
            h = _global_mean(h)
        if "batch_stats" not in self.variables:  # every network has the collection
            self.variable("batch_stats", "none", lambda: jnp.zeros((), jnp.float32))
        return h


def call_arguments(module: nn.Module) -> frozenset[str]:
    """Which of ``train``, ``axis_name``, ``mask`` the module's ``__call__`` names (all three if it
    takes ``**kwargs``)."""
    try:
        params = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset(("train", "axis_name", "mask"))
    return frozenset(k for k in ("train", "axis_name", "mask") if k in params)


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
    backbone: nn.Module  # ConvBackbone, ResNetBackbone or CustomBackbone
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
    backbone: nn.Module  # ConvBackbone, ResNetBackbone or CustomBackbone
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


ARCHITECTURES = ("vgg16", "resnet18", "small")

#: What ``arch`` may be, for messages.
ARCH_FORMS = (f"one of {', '.join(ARCHITECTURES)}, or a module of your own as "
              f"'package.module:Factory' (a flax.linen Module class or a function returning a "
              f"Module instance, called as Factory() or, with --config.width, Factory(width=...))")


def make_backbone(arch: str, kernel_init: Initializer, conv_impl: str = "auto",
                  width: int | None = None, dtype: Any = "float32",
                  loss_scale: float | None = None) -> nn.Module:
    """A built-in backbone: ``arch='vgg16'`` (reference CIFAR VGG-16-BN), ``'resnet18'`` (the CIFAR
    ResNet-18; ``width`` scales its filters, default 64 -> (64, 128, 256, 512)) or ``'small'`` (3
    conv blocks, global pooling; ``width`` scales its first block's filters, default 32 -> filters
    (32, 64, 128)). ``width`` does not apply to VGG-16 (the reference's network).

    ``dtype``: the compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); ``loss_scale``: the
    static loss scale (``None`` or 0: 1, none; see ``maxl_jax.precision``). A backbone of your own:
    ``make_networks(arch=...)``."""
    dt = precision.compute_dtype(dtype)
    prec = dict(dtype=dt, loss_scale=precision.resolve_loss_scale(dt, loss_scale))
    if arch == "vgg16":
        return ConvBackbone(VGG16_FILTERS, VGG16_CONVS_PER_BLOCK, False, kernel_init, conv_impl,
                            **prec)
    if arch == "resnet18":
        w = width or RESNET18_FILTERS[0]
        filters = tuple(w * 2 ** i for i in range(len(RESNET18_FILTERS)))
        return ResNetBackbone(filters, RESNET18_BLOCKS, RESNET18_STRIDES, kernel_init, conv_impl,
                              **prec)
    if arch == "small":
        w = width or SMALL_FILTERS[0]
        filters = tuple(w * 2 ** i for i in range(len(SMALL_FILTERS)))
        return ConvBackbone(filters, SMALL_CONVS_PER_BLOCK, True, kernel_init, conv_impl, **prec)
    raise validation.ConfigError(f"--config.arch: unknown architecture {arch!r}; give "
                                 f"{ARCH_FORMS}")


def resolve_factory(arch: str) -> Callable[..., nn.Module]:
    """The factory an ``arch`` string ``'package.module:Factory'`` names (``Factory`` may be a
    dotted attribute path inside the module), imported. Every way it can fail is one
    ``validation.ConfigError`` naming the problem and the fix."""
    where = f"--config.arch={arch!r}"
    module_path, sep, attr = arch.partition(":")
    if not sep or not module_path.strip() or not attr.strip() or " " in arch:
        raise validation.ConfigError(f"--config.arch: unknown architecture {arch!r}; give "
                                     f"{ARCH_FORMS}")
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as e:
        missing = e.name or module_path
        raise validation.ConfigError(
            f"{where}: there is no module {missing!r} to import. Fix the module path, or put the "
            f"folder that holds it on the Python path (run from that folder, or set "
            f"PYTHONPATH=/path/to/folder); {module_path!r} is imported as `import "
            f"{module_path}`.") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise validation.ConfigError(
            f"{where}: importing {module_path!r} failed with {type(e).__name__}: "
            f"{_one_line(e)}. Fix the module so that `import {module_path}` works.") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items()
                           if not n.startswith("_") and callable(v)
                           and getattr(v, "__module__", None) == module.__name__)
            raise validation.ConfigError(
                f"{where}: module {module_path!r} ({getattr(module, '__file__', '?')}) has no "
                f"attribute {attr!r}. Name a Module class or a function of it that returns a "
                f"Module" + (f"; it defines {', '.join(names)}" if names else "") + ".")
        obj = getattr(obj, part)
    if not callable(obj) and not isinstance(obj, nn.Module):
        raise validation.ConfigError(
            f"{where}: {attr!r} in {module_path!r} is a {type(obj).__name__}, not a factory: name "
            f"a flax.linen Module class or a function that returns a Module instance.")
    return obj


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def build_custom_backbone(arch: Any, width: int | None = None, where: str = "arch") -> nn.Module:
    """One instance of the backbone ``arch`` names: a ``flax.linen.Module`` instance (returned as it
    is; ``width`` must then be None), a factory (a Module class or a function returning a Module),
    called as ``arch()`` or ``arch(width=width)``, or a ``'package.module:Factory'`` string
    (``resolve_factory``). Raises ``validation.ConfigError`` if the factory does not take
    ``width``, fails, or returns something other than a Module."""
    name = arch if isinstance(arch, str) else getattr(arch, "__qualname__", type(arch).__name__)
    label = f"--config.{where}={arch!r}" if isinstance(arch, str) else f"{where}={name}"
    factory = resolve_factory(arch) if isinstance(arch, str) else arch
    if isinstance(factory, nn.Module):
        if width:
            raise validation.ConfigError(
                f"{label}: width={width} cannot resize a Module instance; give its factory (class "
                f"or function) to be called with width=..., or leave width unset (0).")
        return factory.clone()
    if not callable(factory):
        raise validation.ConfigError(f"{label}: a backbone is a flax.linen Module, a Module class "
                                     f"or a function returning a Module, not a "
                                     f"{type(factory).__name__}")
    kwargs = {"width": int(width)} if width else {}
    if kwargs:
        try:
            sig = inspect.signature(factory)
            takes = "width" in sig.parameters or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        except (TypeError, ValueError):
            takes = True
        if not takes:
            raise validation.ConfigError(
                f"{label}: {name} takes no 'width' argument but --config.width={width} was given: "
                f"leave --config.width at 0 (the factory is then called as {name}()), or give the "
                f"factory a width parameter.")
    try:
        module = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's factory failed
        call = f"{name}(width={width})" if kwargs else f"{name}()"
        raise validation.ConfigError(f"{label}: calling {call} failed with {type(e).__name__}: "
                                     f"{_one_line(e)}. Fix the factory so that {call} returns a "
                                     f"flax.linen Module.") from None
    if not isinstance(module, nn.Module):
        raise validation.ConfigError(
            f"{label}: {name}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) returned a "
            f"{type(module).__name__}, not a flax.linen Module: return a Module instance (e.g. "
            f"`return MyNet(width=width)`), or name the Module class itself.")
    return module


def feature_width(backbone: nn.Module, image_shape: Sequence[int] = (32, 32, 3),
                  where: str = "arch") -> int:
    """The width ``F`` of the features ``backbone`` returns for images of ``image_shape``
    (``jax.eval_shape``: nothing is allocated or computed). A backbone that fails on them is a
    ``validation.ConfigError`` saying what it raised."""
    dummy = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    try:
        out = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.PRNGKey(0), x,
                                                                 False)[0], dummy)
    except Exception as e:  # noqa: BLE001 - the user's module failed on the images
        inner = getattr(backbone, "module", backbone)
        raise validation.ConfigError(
            f"{where}: the backbone {type(inner).__name__} fails on images of shape (batch, "
            f"{', '.join(map(str, image_shape))}) with {type(e).__name__}: {_one_line(e)}. Its "
            f"contract (maxl_jax.models.CustomBackbone): NHWC float images in, an optional "
            f"train/axis_name/mask keyword, features (batch, F) or a map (batch, H, W, F) "
            f"out.") from None
    return int(out.shape[-1])


def make_networks(arch: Any, num_primary: int, num_auxiliary: int, generator_classes: int,
                  *, conv_impl: str = "auto", width: int | None = None,
                  head_width: int | None = None, generator_weight_head: bool = False,
                  dtype: Any = "float32", loss_scale: float | None = None,
                  image_shape: Sequence[int] = (32, 32, 3)) -> tuple[MultiTaskNet, LabelGenerator]:
    """The multi-task network and the label generator with the reference's initialisation.

    ``arch``: a built-in backbone's name (``"vgg16"``, ``"resnet18"``, ``"small"``;
    ``make_backbone``), or a backbone of your own: a ``flax.linen.Module`` class or a function
    returning a Module instance (called once for f and once for g, as ``arch()`` or, with
    ``width``, ``arch(width=width)``), a Module instance (cloned for g), or the string
    ``"package.module:Factory"`` (imported; the CLI's ``--config.arch``). Its contract is
    ``CustomBackbone``'s; every method accepts the networks built on it.

    ``num_auxiliary`` is the multi-task network's auxiliary head size (``sum(psi)``, or the number of
    fine classes for the human auxiliary task); ``generator_classes`` is ``sum(psi)``. ``head_width``
    defaults to 512 for VGG-16 and to the backbone's output width otherwise (a backbone of your
    own: its features' width on images of ``image_shape``, found with ``jax.eval_shape``).
    ``generator_weight_head`` adds WAMAL's per-example weight head to the generator. ``dtype`` and
    ``loss_scale``: both networks' compute precision (``maxl_jax.precision``; parameters stay
    float32 and the logits come out float32); a backbone of your own keeps its own precision, so
    these must stay float32 and 1 with one.
    """
    for name, value, low in (("num_primary", num_primary, 1), ("num_auxiliary", num_auxiliary, 0),
                             ("generator_classes", generator_classes, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"make_networks: {name}={value!r} must be an integer >= {low} (the "
                             f"number of {'primary classes' if low else 'classes of that head'})")
    if isinstance(arch, str) and arch in ARCHITECTURES:
        f_backbone = make_backbone(arch, XAVIER_UNIFORM, conv_impl, width, dtype, loss_scale)
        g_backbone = make_backbone(arch, XAVIER_NORMAL, conv_impl, width, dtype, loss_scale)
        if head_width is None:
            head_width = 512 if arch == "vgg16" else f_backbone.filters[-1]
    else:
        label = f"--config.arch={arch!r}" if isinstance(arch, str) else "make_networks(arch=...)"
        if precision.compute_dtype(dtype) is not None or precision.resolve_loss_scale(
                dtype, loss_scale) != 1.0:
            raise validation.ConfigError(
                f"{label}: a backbone of your own computes in its own precision, so dtype="
                f"{dtype!r} and loss_scale={loss_scale!r} would reach the heads alone: leave "
                f"--config.dtype=float32 and --config.loss_scale=1, and build the lower precision "
                f"into the module.")
        f_backbone = CustomBackbone(build_custom_backbone(arch, width))
        g_backbone = CustomBackbone(build_custom_backbone(arch, width))
        features = feature_width(f_backbone, image_shape, label)
        if head_width is None:
            head_width = features
    multitask = MultiTaskNet(num_primary, num_auxiliary, f_backbone, head_width, XAVIER_UNIFORM)
    generator = LabelGenerator(generator_classes, g_backbone, head_width, XAVIER_NORMAL,
                               generator_weight_head)
    return multitask, generator


def count_params(params) -> int:
    """Number of scalars in a params pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))

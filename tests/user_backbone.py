"""Backbones of a user's own, for the tests of ``--config.arch=package.module:Factory`` and
``models.make_networks(arch=...)`` (``tests/test_backbones.py``). Put ``tests/`` on the Python path
and name them as ``user_backbone:Tiny``."""

import flax.linen as nn
import jax.numpy as jnp


class Tiny(nn.Module):
    """One strided 3x3 convolution with flax's own BatchNorm, returning a feature map (pooled by
    ``models.CustomBackbone``); ``width`` filters (``--config.width``)."""

    width: int = 3

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.width, (3, 3), strides=(2, 2))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.relu(x)


class Pooled(nn.Module):
    """No BatchNorm and no ``train`` argument: the per-channel mean and max of the images,
    through one dense layer, as features ``(B, width)``."""

    width: int = 5

    @nn.compact
    def __call__(self, x):
        stats = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        return nn.relu(nn.Dense(self.width)(stats))


def tiny_factory(width: int = 2):
    """A function returning a Module (the other form of factory)."""
    return Tiny(width=width)


def no_width():
    """A factory without a ``width`` parameter."""
    return Tiny()


def not_a_module():
    """A factory that returns no Module."""
    return "Tiny"


def returns_nonsense_features():
    """A Module whose output is neither (B, F) nor (B, H, W, F)."""
    return Flat3d()


class Flat3d(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x).reshape(x.shape[0], -1, 2)

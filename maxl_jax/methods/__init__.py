"""Auxiliary-learning methods, one module each, found by name in a registry.

``get(name)`` returns a method's class; ``names()`` lists them (the CLI's ``--method`` choices);
``build(config, setup)`` builds the method a config names. Every module of this package except
``base`` is imported here, so a new method is one file with a class decorated ``@register``.
See ``maxl_jax.methods.base`` for the interface.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from maxl_jax.methods.base import (LABEL_SOURCES, SOURCES, AuxTask, MetaSchedule, Method, Setup,
                                   label_tasks, multitask_optimizer, networks, psi_of)

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: makes ``cls`` a frozen, keyword-only dataclass (its annotated attributes are
    its fields, like ``Method``'s) and selectable as ``--method=cls.name``."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two methods are named {cls.name!r}: {_REGISTRY[cls.name]} and {cls}")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(_REGISTRY))


def get(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(names())}")
    return _REGISTRY[name]


def build(config, setup: Setup) -> Method:
    """The method ``config.method``, built from ``config`` for ``setup``."""
    return get(config.method).from_config(config, setup)


def defaults() -> dict[str, dict]:
    """Each registered method's own config fields (non-empty ones only), by method name."""
    return {name: cls.defaults() for name, cls in sorted(_REGISTRY.items()) if cls.defaults()}


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LABEL_SOURCES", "SOURCES", "AuxTask", "MetaSchedule", "Method", "Setup", "build",
           "defaults", "get", "label_tasks", "multitask_optimizer", "names", "networks", "psi_of",
           "register"]

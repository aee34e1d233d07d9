"""Checks of a whole run's config that need the method registry: every numeric field, the
precision, and the method's own fields (``validate_config``), and the settings a method would ignore
(``ignored_settings``).

``validation`` holds the checks themselves and imports no method; the methods import
``validation``; this module imports both, so imports point one way (validation <- methods <- here).
"""

from __future__ import annotations

from maxl_jax import methods, validation


def validate_config(config) -> None:
    """Checks every numeric field of a run's config, and the method's own fields (through the
    method class's ``validate_config``), raising ``ConfigError`` on the first problem."""
    for name, (kind, low, inclusive) in validation.RANGES.items():
        if name in config:
            validation.check_range(name, config[name], kind, low, inclusive,
                                   high=1.0 if name == "train_fraction" else None)
    validation.check_precision(config)
    if "method" in config:
        try:
            cls = methods.get(config.method)
        except ValueError as e:
            raise validation.ConfigError(f"--method / --config.method: {e}") from None
        cls.validate_config(config)


def ignored_settings(config, base, method_cls) -> list[str]:
    """The fields of ``config`` changed from ``base`` (the config file's own values) that method
    ``method_cls`` does not read: settings the user gave that would have no effect."""
    method_fields = set()
    for name in methods.names():
        method_fields |= set(methods.get(name).config_fields)
    used = set(method_cls.config_fields)
    out = [f for f in sorted(method_fields - used)
           if f in config and f in base and _plain(config[f]) != _plain(base[f])]
    for name, fields in methods.defaults().items():
        if name == method_cls.name or name not in config or name not in base:
            continue
        out += [f"{name}.{k}" for k in sorted(fields)
                if _plain(config[name][k]) != _plain(base[name][k])]
    return out


def _plain(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v

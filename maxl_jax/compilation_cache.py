"""JAX's persistent compilation cache, as the command line turns it on: a rerun or a resume of the
same config loads its compiled steps from disk instead of compiling them again.

``enable(path)`` points JAX at ``path`` and caches every program however fast it compiled and
however small it is (JAX's defaults skip programs that compile in under a second, which would leave
the tiny configs' steps and the evaluation out). A folder that cannot be written is not an error:
one warning, and the run compiles as without a cache. ``resolve(flag)`` is the command line's
choice of folder: ``--compilation_cache=DIR``, ``none`` to run without one, else
``JAX_COMPILATION_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/maxl_jax/jax_cache`` (by default
``~/.cache/maxl_jax/jax_cache``).
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

OFF = ("none", "off", "")  # --compilation_cache values that turn the cache off


def default_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/maxl_jax/jax_cache``, ``~/.cache/maxl_jax/jax_cache`` when unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "maxl_jax" / "jax_cache"


def resolve(flag: str | None) -> str | None:
    """The folder the command line caches in, or None for no cache. ``flag`` is
    ``--compilation_cache``'s value (None: not given)."""
    if flag is not None:
        return None if flag.strip().lower() in OFF else os.path.expanduser(flag)
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(default_dir())


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot hold the cache (None: it can). A remote path (``gs://...``) is JAX's to
    check."""
    if "://" in path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".maxl_write_check_"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def enable(path: str | None, warn=None) -> str | None:
    """Turns the persistent cache on at ``path`` (None: leaves it off) and returns the folder in use,
    or None when off. An unwritable folder: ``warn`` (default: one line on stderr) once, and off.
    Call it before the first compilation: JAX opens its cache once per process."""
    import jax

    if path is None:
        return None
    reason = _unwritable(path)
    if reason is not None:
        message = (f"Warning: the compilation cache folder {path} cannot be written ({reason}); "
                   f"compiling without a cache (--compilation_cache=DIR moves it, "
                   f"--compilation_cache=none turns it off).")
        if warn is None:
            print(message, file=sys.stderr, flush=True)
        else:
            warn(message)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: every size
    return path

"""Test-session set-up: one persistent XLA compilation cache for the whole session (this process and
every subprocess a test starts), so a program that several tests compile, the same tiny run through
the library and through the command line for instance, compiles once. Set before JAX is imported;
a cache directory of the user's own (``JAX_COMPILATION_CACHE_DIR``) is respected."""

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="maxl_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

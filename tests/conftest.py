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


# ------------------------------------------------------------------ the multi-device check
# tests/multidevice_check.py (8 fake CPU devices, every method on 1 and 8 devices) is the suite's
# longest single computation. It starts in the background as soon as a session has collected a
# test that needs it, once per session however many xdist workers there are, so that no worker
# sits waiting for it; the ``multidevice`` fixture (tests/test_parallel.py) waits for its result.

import fcntl  # noqa: E402
import pathlib  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def multidevice_folder(tmp_path_factory) -> pathlib.Path:
    """The session's folder for the check's output, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def start_multidevice_check(folder: pathlib.Path) -> None:
    """Starts the check unless this session already has: its stdout, stderr and, when it ends, its
    exit status (``rc``) land in ``folder``."""
    with open(folder / "multidevice.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "multidevice.started").exists():
            return
        (folder / "multidevice.started").touch()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out, err, rc = (shlex.quote(str(folder / n)) for n in ("multidevice.out",
                                                                 "multidevice.err", "multidevice"))
        script = shlex.quote(str(ROOT / "tests" / "multidevice_check.py"))
        subprocess.Popen(
            ["sh", "-c", f"{shlex.quote(sys.executable)} {script} > {out} 2> {err}; "
                         f"echo $? > {rc}.rc.tmp; mv {rc}.rc.tmp {rc}.rc"],
            env=env, start_new_session=True)


def pytest_collection_finish(session):
    if any("multidevice" in getattr(item, "fixturenames", ()) for item in session.items):
        start_multidevice_check(multidevice_folder(session.config._tmp_path_factory))

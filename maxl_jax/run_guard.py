"""What guards a run's workdir and process: the workdir lock (one writer per workdir), the
``Interrupted`` stop that SIGINT / SIGTERM turn into, the clean-up of a workdir a failed start left
empty, and the fault-injection hook of the reliability tests (``MAXL_FAULT``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import signal
import socket
import sys
import time

from maxl_jax import distributed, validation


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint; ``signum`` says which."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.message = message


# ------------------------------------------------------------------------------------ data


def interrupt(signum) -> Interrupted:
    return Interrupted(signum, f"signal {signum}")


class WorkdirLock:
    """One writer per workdir: an exclusive ``flock`` on ``<workdir>/.maxl.lock`` (released by the
    kernel when the process dies, however it dies). A second process is refused with a message
    naming the first. In a multi-process run process 0 alone takes it, for all: the others write
    no file but their part of the checkpoints, and a second run of several processes is refused at
    its process 0, which tells the others (``workdir_lock``): every process exits with the
    message."""

    NAME = ".maxl.lock"

    def __init__(self, workdir: pathlib.Path):
        self.path = workdir / self.NAME

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as e:
            raise validation.ConfigError(
                f"cannot use {self.path.parent} as the workdir ({type(e).__name__}: {e}); choose "
                f"another --workdir") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise validation.ConfigError(
                f"the workdir {self.path.parent} is in use by {holder}: two runs cannot write one "
                f"workdir. Wait for it to finish (or stop it), or use another --workdir.") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()} on {socket.gethostname()}, started "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv)[:200]})\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        try:
            self.path.unlink()
        except OSError:
            pass
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
    """``WorkdirLock`` for the run: process 0 takes it for all processes, and its refusal (a
    ``ConfigError``) stops every process with its message."""
    if not distributed.multi_process():
        with WorkdirLock(workdir):
            yield
        return
    lock = distributed.primary_first(lambda: WorkdirLock(workdir).__enter__())
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def remove_if_empty(workdir: pathlib.Path) -> None:
    """Removes a workdir this run created if the run left nothing in it (a failed start)."""
    if not workdir.is_dir():
        return
    leftovers = [p for p in workdir.rglob("*") if p.is_file() and p.name != WorkdirLock.NAME]
    if not leftovers:
        shutil.rmtree(workdir, ignore_errors=True)


def fault(point: str, value) -> None:
    """Fault injection for the reliability tests: ``MAXL_FAULT="point:value[=SIGNAL],..."`` makes the
    process send itself SIGKILL (or the named signal, e.g. ``=INT``) when it reaches that point.
    Points: ``event`` (the run's N-th step, counted from 1 over all epochs), ``saved`` (just after
    the checkpoint of step N), ``eval`` (during epoch N's evaluation, 1-based), ``record`` (just
    after epoch N's record is written)."""
    for entry in os.environ.get("MAXL_FAULT", "").split(","):
        where, _, sig = entry.partition("=")
        if where == f"{point}:{value}":
            sys.stdout.flush()
            os.kill(os.getpid(), getattr(signal, f"SIG{sig}") if sig else signal.SIGKILL)

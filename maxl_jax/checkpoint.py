"""Orbax checkpoints of the train state: the run's identity beside it, and a checksum that restore
verifies.

Each checkpoint holds three items: ``state`` (the ``TrainState`` pytree, restored into an abstract
target so shapes, dtypes and shardings come from the current run), ``run`` (JSON: the settings that
must match to resume, e.g. method, psi, architecture, data set) and ``checksum`` (JSON: the SHA-256 of
the state's bytes, leaf by leaf, computed before the save). Saves are synchronous, so a failed write
raises at once (``CheckpointWriteError``) instead of leaving writer threads behind.

Restore refuses, with a ``CheckpointError`` naming the directory and the fix, and never overwrites or
deletes: a checkpoint of another run; one that cannot be read or whose bytes fail the checksum (a
``DamagedCheckpointError``, which names the newest intact older checkpoint and how to resume from it).
Several processes (``maxl_jax.distributed``) save and restore together into one shared directory:
Orbax writes each process's part of the state and, from process 0, the JSON items; every process
computes the checksum from the replicated state, so all agree on it.

Resuming from an older checkpoint is the user's explicit choice (``restore(step=...)`` or
``fallback=True``); the damaged newer ones are then moved, intact, to ``damaged_checkpoints/`` beside
the checkpoint folder, so that new saves can take their step numbers.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from maxl_jax import distributed
from maxl_jax.train_state import TrainState

ITEMS = ("state", "run", "checksum")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed: another run's, unreadable, or damaged."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint that fails to restore or fails its checksum. ``step`` is the damaged one,
    ``intact_step`` the newest intact older one (``None`` if there is none)."""

    def __init__(self, message: str, step: int, intact_step: int | None):
        super().__init__(message)
        self.step = step
        self.intact_step = intact_step


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (permissions, disk full, ...)."""


def state_checksum(state: Any) -> str:
    """SHA-256 of a pytree's arrays: every leaf's path, dtype, shape and bytes, in tree order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]:
        arr = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


class Checkpointer:
    """Saves and restores ``TrainState`` in ``directory`` (made absolute), keeping the last ``keep``."""

    def __init__(self, directory: str | pathlib.Path, run_identity: dict[str, Any], keep: int = 3):
        self.directory = pathlib.Path(directory).expanduser().absolute()
        self.run_identity = dict(run_identity)
        self.keep = keep
        self.manager = self._manager()

    def _manager(self):
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=False,
                                               enable_async_checkpointing=False)
        return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if self.directory.exists() else []

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def ensure_writable(self) -> None:
        """Makes the folder and proves it can be written, before any training (raises
        ``CheckpointWriteError``)."""
        probe = self.directory / f".write_probe_{os.getpid()}_{time.time_ns()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot write checkpoints to {self.directory} ({type(e).__name__}: {e}). Nothing "
                f"was trained. Fix the folder's permissions or free space, or use another "
                f"--workdir.") from None

    def save(self, step: int, state: TrainState) -> None:
        """Writes ``state`` under ``step`` with its checksum (a no-op if ``step`` exists).

        Raises:
          CheckpointWriteError: the write failed; the earlier checkpoints are kept.
        """
        if step in self.steps():
            return
        checksum = {"sha256": state_checksum(state)}
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(self.run_identity),
                checksum=ocp.args.JsonSave(checksum)))
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - any failure to write is the same to the user
            raise CheckpointWriteError(
                f"cannot write the checkpoint of step {step} to {self.directory} "
                f"({type(e).__name__}: {str(e)[:300]}). Training stopped; the earlier checkpoints "
                f"are kept. Free disk space or fix the folder's permissions, then run the same "
                f"command to resume.") from None

    # ------------------------------------------------------------------------------- restore
    def restore(self, target: TrainState, step: int | None = None, *, fallback: bool = False,
                log: Callable[[str], None] = print) -> TrainState:
        """Restores the newest (or ``step``) checkpoint into the structure and shardings of
        ``target``, verified against its checksum.

        With ``step`` below the newest, or with ``fallback`` (the newest is damaged: take the newest
        intact one), the damaged newer checkpoints are moved to ``damaged_checkpoints/``.

        Raises:
          CheckpointError: a checkpoint of a run with other settings, or no checkpoint.
          DamagedCheckpointError: the checkpoint is unreadable or fails its checksum; the message
            names the newest intact older checkpoint.
        """
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise CheckpointError(f"no checkpoint of step {chosen} in {self.directory}; it holds "
                                  f"steps {steps}")
        try:
            # An unreadable run record is damage like any other (the fallback applies); a readable
            # one of other settings is a different run's checkpoint (CheckpointError, no fallback).
            self._check_identity(chosen)
            state = self._restore_verified(target, chosen)
        except DamagedCheckpointError as damaged:
            intact = self.newest_intact(target, below=chosen)
            if not fallback or intact is None:
                raise DamagedCheckpointError(_damage_message(str(damaged), self.directory, intact),
                                             chosen, intact) from None
            log(f"{damaged} Resuming from the newest intact checkpoint, step {intact}.")
            chosen, state = intact, self._restore_verified(target, intact)
        newer = [s for s in steps if s > chosen]
        if newer:
            self._set_aside(newer, log)
        return state

    def newest_intact(self, target: TrainState, below: int) -> int | None:
        """The newest checkpoint below step ``below`` that restores and passes its checksum."""
        for s in reversed([s for s in self.steps() if s < below]):
            try:
                self._check_identity(s)
                self._restore_verified(target, s)
                return s
            except CheckpointError:
                continue
        return None

    def _check_identity(self, step: int) -> None:
        where = self.directory / str(step)
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(
                run=ocp.args.JsonRestore()))["run"]
        except Exception as e:  # noqa: BLE001 - any read failure means an unusable checkpoint
            raise DamagedCheckpointError(
                f"cannot read the checkpoint at {where} ({type(e).__name__}: {str(e)[:200]}).",
                step, None) from None
        diff = {k: (saved.get(k), v) for k, v in self.run_identity.items() if saved.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"the checkpoint at {where} belongs to a different run ({lines}). It is left "
                f"untouched: use another --workdir, or the same settings to resume it.")

    def _restore_verified(self, target: TrainState, step: int) -> TrainState:
        where = self.directory / str(step)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), checksum=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpointError(
                f"cannot restore the train state from {where} ({type(e).__name__}: "
                f"{str(e)[:200]}): the checkpoint is damaged or from an incompatible version.",
                step, None) from None
        want = (restored["checksum"] or {}).get("sha256")
        got = state_checksum(restored["state"])
        if want != got:
            raise DamagedCheckpointError(
                f"the checkpoint at {where} fails its checksum (saved {str(want)[:12]}..., read "
                f"{got[:12]}...): its files were changed after it was written.", step, None)
        return restored["state"]

    def _set_aside(self, steps: list[int], log) -> None:
        """Moves ``steps`` aside (process 0 alone moves them; every process waits for the move)."""
        if jax.process_index() == 0:
            aside = self.directory.parent / "damaged_checkpoints"
            aside.mkdir(exist_ok=True)
            for s in steps:
                dest = aside / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(str(self.directory / str(s)), str(dest))
                log(f"Moved checkpoint {s} (newer than the one resumed) to {dest}, intact.")
        distributed.barrier("maxl_jax checkpoints set aside")
        self.manager.close()
        self.manager = self._manager()

    def prune(self) -> list[int]:
        """Deletes all but the newest ``keep`` checkpoints (every process calls it; Orbax decides
        which one deletes) and returns the deleted steps. Orbax prunes after each save; this catches what a kill between a save and
        its pruning left behind (called once a run is complete, when no fallback is needed)."""
        extra = self.steps()[:-self.keep] if self.keep else []
        for step in extra:
            self.manager.delete(step)
        return extra

    def close(self) -> None:
        self.manager.close()


def _damage_message(what: str, directory: pathlib.Path, intact: int | None) -> str:
    if intact is None:
        return (f"{what} It is left untouched, and no older checkpoint in {directory} is intact: "
                f"start again with another --workdir.")
    return (f"{what} It is left untouched. The newest intact checkpoint is {directory / str(intact)}: "
            f"resume from it by adding --config.resume_step={intact} to the same command (or "
            f"--config.resume_from_intact=True to take the newest intact one automatically).")


def read_state(directory: str | pathlib.Path, step: int | None = None):
    """The train state saved under ``step`` (default: the newest) in a checkpoint ``directory``, as a
    pytree of host numpy arrays, whatever device layout wrote it (e.g. to inspect a run, or compare
    two). ``directory`` is the run's ``checkpoints/`` folder."""
    directory = pathlib.Path(directory).expanduser().absolute()
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}")
    path = directory / str(steps[-1] if step is None else step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    device = jax.local_devices(backend="cpu")[0]
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(device)),
        metadata, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    return jax.device_get(checkpointer.restore(path, target))

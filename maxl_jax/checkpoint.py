"""Orbax checkpoints of the train state, with the run's identity stored beside it.

Each checkpoint holds two items: ``state`` (the ``TrainState`` pytree, restored into an abstract
target so shapes, dtypes and shardings come from the current run) and ``run`` (JSON: the settings that
must match to resume, e.g. method, psi, architecture, dataset). A checkpoint of another run, or one
that cannot be read, raises ``CheckpointError`` naming the directory and the fix; nothing is
overwritten or deleted in that case.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from maxl_jax.train_state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed: another run's, or unreadable."""


class Checkpointer:
    """Saves and restores ``TrainState`` in ``directory`` (made absolute), keeping the last ``keep``.

    Saves are asynchronous; ``wait()`` (also called by ``close()`` and before every restore) blocks
    until they are on disk.
    """

    def __init__(self, directory: str | pathlib.Path, run_identity: dict[str, Any], keep: int = 3):
        self.directory = pathlib.Path(directory).expanduser().absolute()
        self.run_identity = dict(run_identity)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "run"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState) -> None:
        """Starts an asynchronous save of ``state`` under ``step`` (a no-op if it exists)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(self.run_identity)))

    def restore(self, target: TrainState, step: int | None = None) -> TrainState:
        """Restores the latest (or ``step``) checkpoint into the structure/shardings of ``target``.

        Raises:
          CheckpointError: if the checkpoint belongs to a run with other settings, or is unreadable.
        """
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        where = self.directory / str(step)
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(
                run=ocp.args.JsonRestore()))["run"]
        except Exception as e:  # noqa: BLE001 - any read failure means an unusable checkpoint
            raise CheckpointError(
                f"cannot read the checkpoint at {where} ({type(e).__name__}: {e}). It is left "
                f"untouched: move it away or start with another --workdir.") from e
        diff = {k: (saved.get(k), v) for k, v in self.run_identity.items() if saved.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"the checkpoint at {where} belongs to a different run ({lines}). It is left "
                f"untouched: use another --workdir, or the same settings to resume it.")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"cannot restore the train state from {where} ({type(e).__name__}: {e}). The "
                f"checkpoint is corrupt or from an incompatible version; it is left untouched: move "
                f"it away or start with another --workdir.") from e
        return restored

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self, wait: bool = True) -> None:
        """Waits for pending saves (unless ``wait=False``, after an error) and shuts the manager."""
        if wait:
            self.wait()
        self.manager.close()


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

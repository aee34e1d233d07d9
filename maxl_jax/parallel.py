"""Data parallelism: one ``jax.jit`` over a device mesh, batch split on the ``data`` axis.

Parameters, BatchNorm statistics and optimizer states are replicated; batches are sharded on their
leading axis. XLA inserts the cross-device reductions (BatchNorm statistics and loss means are taken
over the global batch), so a step on 8 devices computes the same numbers as on one. A batch the
devices do not divide (the reference's 100 on a TPU's 8 cores) is padded to the next multiple with
a ``mask`` that every mean and BatchNorm statistic honours (``pad_batch``), so it too computes what
one device computes. The same pure steps also run inside a user's ``shard_map`` through their
``axis_name`` argument (``shard_map_step``; there the batch must divide).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxl_jax.methods.base import Method
from maxl_jax.train_state import TrainState

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, num_devices: int) -> None:
    """``ValueError`` unless the batch splits evenly over the devices."""
    if batch_size % num_devices:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {num_devices} devices of the mesh: "
            f"use a multiple of {num_devices} (e.g. {max(num_devices, batch_size - batch_size % num_devices)})")


def validate_batch(batch: dict, image_shape: Sequence[int], num_devices: int, *,
                   num_primary: int | None = None, aux_tasks: Sequence = (),
                   needs_aux: bool = False) -> None:
    """Checks a batch's keys, shapes, dtypes and label ranges before anything is compiled.

    Raises ``ValueError`` naming the problem: a missing key, images not ``(B, H, W, C)`` float with
    ``(H, W, C) == image_shape``, labels not integer ``(B,)`` (``aux``: ``(B, T)`` or ``(B,)``),
    a primary label outside ``[0, num_primary)``, an auxiliary label outside its task or outside the
    block of its example's primary class (``aux_tasks``: the method's ``AuxTask``s), or ``B`` not
    divisible by the devices.
    """
    needs_aux = needs_aux or bool(aux_tasks)
    required = ("image", "primary") + (("aux",) if needs_aux else ())
    for key in required:
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}: expected keys {required}")
    image = batch["image"]
    if image.ndim != 4 or tuple(image.shape[1:]) != tuple(image_shape):
        raise ValueError(f"batch['image'] has shape {tuple(image.shape)}; expected "
                         f"(batch, {', '.join(map(str, image_shape))})")
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(f"batch['image'] has dtype {image.dtype}; expected float (normalised "
                         f"images, see maxl_jax.data.normalize)")
    b = image.shape[0]
    for key in required[1:]:
        lab = batch[key]
        ok_shape = lab.shape == (b,) or (key == "aux" and lab.ndim == 2 and lab.shape[0] == b)
        if not ok_shape or not jnp.issubdtype(lab.dtype, jnp.integer):
            raise ValueError(f"batch[{key!r}] has shape {tuple(lab.shape)} and dtype {lab.dtype}; "
                             f"expected integer labels of shape ({b},)"
                             + (" or (batch, tasks)" if key == "aux" else ""))
    if num_primary is not None:
        _check_labels(batch, num_primary, aux_tasks, needs_aux)
    check_batch_size(b, num_devices)


def pad_batch(batch: dict, multiple: int) -> dict:
    """``batch`` padded along its leading axis to a multiple of ``multiple`` (zeros: images, label 0)
    with ``mask`` 1 on the real examples, 0 on the padding (an existing ``mask`` is extended)."""
    b = batch["image"].shape[0]
    extra = -b % multiple
    if not extra:
        return batch
    out = {k: np.concatenate([np.asarray(v), np.zeros((extra, *np.shape(v)[1:]),
                                                      np.asarray(v).dtype)])
           for k, v in batch.items() if k != "mask"}
    mask = np.asarray(batch.get("mask", np.ones(b, np.float32)), np.float32)
    out["mask"] = np.concatenate([mask, np.zeros(extra, np.float32)])
    return out


def _check_labels(batch: dict, num_primary: int, aux_tasks: Sequence, has_aux: bool) -> None:
    primary = np.asarray(batch["primary"])
    bad = np.flatnonzero((primary < 0) | (primary >= num_primary))
    if bad.size:
        raise ValueError(f"batch['primary'][{bad[0]}] = {primary[bad[0]]} is outside [0, "
                         f"{num_primary}): primary labels index the {num_primary} primary classes")
    if not has_aux or not aux_tasks:
        return
    aux = np.asarray(batch["aux"])
    aux = aux[:, None] if aux.ndim == 1 else aux
    if aux.shape[1] != len(aux_tasks):
        raise ValueError(f"batch['aux'] has {aux.shape[1]} column(s) but the method has "
                         f"{len(aux_tasks)} auxiliary task(s)")
    for t, task in enumerate(aux_tasks):
        psi = np.asarray(task.psi)
        lab = aux[:, t]
        starts = np.concatenate([[0], np.cumsum(psi)[:-1]])
        lo, hi = starts[primary], starts[primary] + psi[primary]
        bad = np.flatnonzero((lab < lo) | (lab >= hi))
        if bad.size:
            i = bad[0]
            raise ValueError(
                f"batch['aux'][{i}, {t}] = {lab[i]} is outside the auxiliary block "
                f"[{lo[i]}, {hi[i]}) of its primary class {primary[i]} (task {task.source!r}, "
                f"psi={list(task.psi)})")


class DataParallelSteps:
    """A method's steps compiled once for ``mesh`` (state replicated, batches sharded).

    ``train_step(state, batch)``, ``meta_step(state, batches)`` (``batches``: a dict from each of the
    method's meta sources to a batch) and ``eval_step(state, batch)`` validate their batches first,
    pad a batch the devices do not divide (``pad_batch``), then run the compiled step; the state
    argument is donated.
    """

    def __init__(self, method: Method, image_shape: Sequence[int], mesh: Mesh | None = None):
        self.method = method
        self.image_shape = tuple(image_shape)
        self.mesh = mesh or make_mesh()
        rep, shard = replicated(self.mesh), data_sharded(self.mesh)
        self._train = jax.jit(method.train_step, in_shardings=(rep, shard),
                              out_shardings=(rep, rep), donate_argnums=0)
        self._meta = (jax.jit(method.meta_step, in_shardings=(rep, shard), out_shardings=(rep, rep),
                              donate_argnums=0) if method.has_meta else None)
        self._eval = jax.jit(method.eval_step, in_shardings=(rep, shard), out_shardings=rep)

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def place_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, replicated(self.mesh))

    def _check(self, batch, aux_tasks=()):
        validate_batch(batch, self.image_shape, 1, num_primary=self.method.num_primary,
                       aux_tasks=aux_tasks)
        return pad_batch(batch, self.num_devices)

    def train_step(self, state: TrainState, batch: dict):
        return self._train(state, self._check(batch, self.method.aux_tasks))

    def meta_step(self, state: TrainState, batches: dict):
        if self._meta is None:
            raise ValueError(f"method {self.method.name!r} has no meta step")
        sources = self.method.schedule.sources
        if set(batches) != set(sources):
            raise ValueError(f"the meta step of {self.method.name!r} takes batches "
                             f"{list(sources)}, got {sorted(batches)}")
        batches = {source: self._check(batch, self.method.aux_tasks if source != "held_out" else ())
                   for source, batch in batches.items()}  # training batches carry aux labels
        return self._meta(state, batches)

    def eval_step(self, state: TrainState, batch: dict):
        return self._eval(state, self._check(batch))


def shard_map_step(step: Callable, mesh: Mesh) -> Callable:
    """``step(state, batch, axis_name)`` run under ``jax.shard_map`` on ``mesh``'s ``data`` axis.

    Each device sees its slice of the batch; the step's ``axis_name`` reductions make every device
    compute the global result, so the returned state and metrics are replicated.
    """
    def body(state, batch):
        return step(state, batch, axis_name=DATA_AXIS)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P()))

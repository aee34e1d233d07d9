"""Data parallelism: one ``jax.jit`` over a device mesh, batch split on the ``data`` axis.

Parameters, BatchNorm statistics and optimizer states are replicated; batches are sharded on their
leading axis. XLA inserts the cross-device reductions (BatchNorm statistics and loss means are taken
over the global batch), so a step on 8 devices computes the same numbers as on one. The same pure
steps also run inside a user's ``shard_map`` through their ``axis_name`` argument
(``shard_map_step``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxl_jax.steps import Maxl
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


def validate_batch(batch: dict, image_shape: Sequence[int], num_devices: int,
                   needs_aux: bool = False) -> None:
    """Checks a batch's keys, shapes and dtypes before anything is compiled.

    Raises ``ValueError`` naming the problem: a missing key, images not ``(B, H, W, C)`` float with
    ``(H, W, C) == image_shape``, labels not integer ``(B,)``, or ``B`` not divisible by the devices.
    """
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
        if lab.shape != (b,) or not jnp.issubdtype(lab.dtype, jnp.integer):
            raise ValueError(f"batch[{key!r}] has shape {tuple(lab.shape)} and dtype {lab.dtype}; "
                             f"expected integer labels of shape ({b},)")
    check_batch_size(b, num_devices)


class DataParallelSteps:
    """``trainer``'s steps compiled once for ``mesh`` (state replicated, batch sharded).

    ``theta1_step(state, batch)``, ``theta2_step(state, batch)`` and ``eval_step(state, batch)``
    validate their batch first, then run the compiled step; the state argument is donated.
    """

    def __init__(self, trainer: Maxl, image_shape: Sequence[int], mesh: Mesh | None = None):
        self.trainer = trainer
        self.image_shape = tuple(image_shape)
        self.mesh = mesh or make_mesh()
        rep, shard = replicated(self.mesh), data_sharded(self.mesh)
        self._theta1 = jax.jit(trainer.theta1_step, in_shardings=(rep, shard),
                               out_shardings=(rep, rep), donate_argnums=0)
        self._theta2 = jax.jit(trainer.theta2_step, in_shardings=(rep, shard),
                               out_shardings=(rep, rep), donate_argnums=0)
        self._eval = jax.jit(trainer.eval_step, in_shardings=(rep, shard), out_shardings=rep)

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def place_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, replicated(self.mesh))

    def _check(self, batch, needs_aux=False):
        validate_batch(batch, self.image_shape, self.num_devices, needs_aux)

    def theta1_step(self, state: TrainState, batch: dict):
        self._check(batch, self.trainer.method in ("human", "random"))
        return self._theta1(state, batch)

    def theta2_step(self, state: TrainState, batch: dict):
        self._check(batch)
        return self._theta2(state, batch)

    def eval_step(self, state: TrainState, batch: dict):
        self._check(batch)
        return self._eval(state, batch)


def shard_map_step(step: Callable, mesh: Mesh) -> Callable:
    """``step(state, batch, axis_name)`` run under ``jax.shard_map`` on ``mesh``'s ``data`` axis.

    Each device sees its slice of the batch; the step's ``axis_name`` reductions make every device
    compute the global result, so the returned state and metrics are replicated.
    """
    def body(state, batch):
        return step(state, batch, axis_name=DATA_AXIS)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P()))

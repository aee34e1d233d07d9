"""Several cooperating processes (one per host, or per GPU): start-up and the few host-side agreements
the training loop needs.

``initialize`` calls ``jax.distributed.initialize`` before any JAX computation, with the coordinator
address, process count and process id taken, in this order, from the arguments (the command line's
``--coordinator_address``, ``--num_processes``, ``--process_id``), from ``MAXL_COORDINATOR_ADDRESS``
/ ``MAXL_NUM_PROCESSES`` / ``MAXL_PROCESS_ID``, or from ``JAX_COORDINATOR_ADDRESS`` (JAX's own) /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``; outside a cluster all three are needed. With none of
them set, the processes of a cluster JAX recognises (Cloud TPU pod slices, SLURM, Open MPI,
Kubernetes) start multi-process automatically when that cluster runs more than one process (what
is given there overrides what JAX detects); anywhere else the run stays one process, exactly as
before. ``--num_processes=1`` alone keeps a run one process even inside such a cluster (e.g. a
plain ``python`` line in a SLURM batch script of several tasks, which is not one of them). On the
CPU, cross-process collectives go through Gloo (``jax_cpu_collectives_implementation``), set before
the backend starts.

After start-up ``jax.devices()`` lists every process's devices; the mesh spans them all
(``parallel.make_mesh``). What the loop needs on top (``maxl_jax.train``):

* ``put``: a host array (the same on every process) placed on a global sharding, each process
  transferring only the shards of its own devices (``jax.make_array_from_callback``);
* ``is_primary``: process 0 alone writes logs, ``metrics.jsonl``, ``summary.json`` and the plot;
* ``broadcast_json``: process 0's view of a small host value (the records read back from
  ``metrics.jsonl``), so every process takes the same decisions and the same collective steps;
* ``primary_first``: something process 0 alone does first (take the workdir lock, read the records,
  download the data), whose failure stops every process at once with its message;
* ``agreed_signal``: a stop request (SIGINT / SIGTERM) seen by any process stops all of them at the
  same step;
* ``barrier``: every process waits for the others (around process 0's file moves).

What a multi-process run needs: a workdir every process reaches at the same path (a shared file
system; Orbax writes each process's part of a checkpoint there and every process reads it back),
and the data on every host (or ``--config.download=True``: process 0 fetches first, then the
others find a shared copy or fetch their own). Its numbers are those of one process with as many
devices, up to the float rounding of the cross-process sums (they are summed in another order).
A process that dies takes the others down when JAX's runtime notices it gone. On the CPU the Gloo
sums of a small model cost more than its steps: several CPU processes are for tests and trials.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

ENV = {"coordinator_address": ("MAXL_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
       "num_processes": ("MAXL_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
       "process_id": ("MAXL_PROCESS_ID", "JAX_PROCESS_ID")}


def _from_env(name: str) -> str | None:
    for var in ENV[name]:
        if os.environ.get(var, "") != "":
            return os.environ[var]
    return None


def detected_cluster() -> str | None:
    """The name of the multi-process cluster JAX would configure itself for (its own detection of
    Cloud TPU, SLURM, Open MPI, Kubernetes), or ``None`` when there is none or it runs one process."""
    try:
        from jax._src import clusters
        kinds = clusters.ClusterEnv._cluster_types
    except (ImportError, AttributeError):  # JAX's detection moved: fall back to the environment
        if all(v in os.environ for v in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")):
            return "slurm" if int(os.environ["SLURM_NTASKS"]) > 1 else None
        if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
            return "ompi"
        return None
    for kind in kinds:
        try:
            if kind.opt_in_only_method or not kind.is_env_present():
                continue
            if int(kind.get_process_count()) > 1:
                return getattr(kind, "name", kind.__name__)
        except Exception:  # noqa: BLE001 - a cluster that cannot describe itself is not ours
            continue
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts the multi-process runtime if asked (arguments or environment) or on a multi-process
    cluster; returns whether it did. Call it before any JAX computation; calling it again, or
    after JAX's runtime was started by hand, changes nothing.

    Raises:
      ValueError: some settings given but not all, or inconsistent ones.
    """
    if jax.distributed.is_initialized():
        return True
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    given = {k: v if v not in (None, "") else _from_env(k) for k, v in given.items()}
    explicit = {k: v for k, v in given.items() if v is not None}
    if explicit.get("num_processes") is not None and int(explicit["num_processes"]) == 1:
        return False  # one process asked for (also on a cluster JAX would detect): stay one
    cluster = detected_cluster()
    if explicit and cluster is None:
        missing = sorted(set(given) - set(explicit))
        if missing:
            raise ValueError(
                "a multi-process run needs --coordinator_address, --num_processes and "
                "--process_id (or MAXL_COORDINATOR_ADDRESS, MAXL_NUM_PROCESSES, MAXL_PROCESS_ID); "
                f"missing: {', '.join('--' + m for m in missing)}")
    if "num_processes" in explicit and "process_id" in explicit:
        n, i = int(explicit["num_processes"]), int(explicit["process_id"])
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"process id {i} is not in [0, {n}) (--num_processes={n})")
    if not explicit and cluster is None:
        return False
    _use_gloo()
    # On a detected cluster, JAX fills in what was not given.
    jax.distributed.initialize(
        coordinator_address=explicit.get("coordinator_address"),
        num_processes=int(explicit["num_processes"]) if "num_processes" in explicit else None,
        process_id=int(explicit["process_id"]) if "process_id" in explicit else None)
    return True


def _use_gloo() -> None:
    """Cross-process collectives on the CPU (used on a CPU-only cluster and by the tests; GPUs and
    TPUs have their own)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # a JAX without the option: CPU runs stay one process
        pass


def is_primary() -> bool:
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def put(tree: Any, sharding) -> Any:
    """``tree`` (host values, the same in every process) as global arrays with ``sharding``; each
    process transfers only the shards its own devices hold. One process: ``jax.device_put``."""
    if not multi_process():
        return jax.device_put(tree, sharding)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(one, tree)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing with one process)."""
    if multi_process():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def broadcast_json(value: Any) -> Any:
    """Process 0's ``value`` (anything JSON can hold) in every process."""
    if not multi_process():
        return value
    from jax.experimental import multihost_utils
    text = json.dumps(value).encode() if is_primary() else b""
    data = np.frombuffer(text, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buffer = np.zeros(size, np.uint8)
    buffer[:data.size] = data
    out = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
    return json.loads(out.tobytes().decode())


class PeerError(RuntimeError):
    """Raised in every other process when process 0 stopped on an error (named in the message)."""


def primary_first(fn):
    """``fn()`` run by process 0 alone; returns its result there and ``None`` in the others. An
    exception ``fn`` raises is raised in process 0 and, as a ``PeerError`` naming it, in every
    other process, instead of leaving them waiting for process 0 at the next collective. A
    collective: every process calls it at the same point. One process: ``fn()``."""
    if not multi_process():
        return fn()
    result, failure = None, None
    if is_primary():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - raised below, once the others are told
            failure = e
    told = broadcast_json(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if told is not None:
        raise PeerError(f"process 0 stopped: {told}")
    return result


def agreed_signal(signum: int | None) -> int | None:
    """The stop signal every process acts on: ``signum`` seen here or the one another process saw
    (the largest number when several), ``None`` when none. One process: ``signum`` itself. With
    several, every process must call it at the same point: it is a collective."""
    if not multi_process():
        return signum
    from jax.experimental import multihost_utils
    seen = np.asarray(multihost_utils.process_allgather(np.int32(signum or 0)))
    top = int(seen.max())
    return top or None

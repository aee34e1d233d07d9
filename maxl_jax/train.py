"""The training loop of every registered method: data on the devices, the method's epoch, checkpoints,
logs, plots.

``train_and_evaluate(config, workdir)`` runs one experiment. Each split is held as arrays on the
devices; a compiled step gathers its batch by index, augments and normalises it inside XLA (keys from
the seed and the step counters), and runs the method's pure step (``maxl_jax.methods``). The loop
knows methods only through their interface: ``train_step``, ``meta_step``, ``eval_step`` and the
``schedule`` that orders them in an epoch (for MAXL, the reference's two passes: one theta1 step per
batch, then one theta2 step per batch of a fresh shuffle). After the epoch's steps the primary head is
evaluated on the test set. Consecutive steps of one kind run up to ``steps_per_call`` at a time in
one compiled call (a ``lax.scan`` over their batches' indices), cut short at the end of a pass and
wherever a checkpoint is due: fewer host round-trips on accelerators, the same numbers.

What makes a run exact across interruptions:

* the position in the run is the state's counters (``step + meta_step`` events into the fixed
  sequence of the method's epochs), so a run resumed from any checkpoint takes the same steps with
  the same batches and keys;
* the running sums of the epoch's metrics live in the state (``TrainState.sums``) and so in every
  checkpoint: a resumed epoch logs what an uninterrupted one logs;
* an epoch counts as done when its record is in ``metrics.jsonl``; a run stopped after the epoch's
  last step was checkpointed but before its record was written rebuilds the record on resume.

Written to the workdir: ``checkpoints/``, ``metrics.jsonl`` (one line per epoch), ``summary.json``
and ``learning_curves.png``; the records' formats and the summary are ``maxl_jax.records``'s, the
workdir lock, the signals and the fault hooks ``maxl_jax.run_guard``'s.

Several processes (``maxl_jax.distributed``, started before this is called): the mesh spans every
process's devices and the loop is the same program in each process, which takes the same decisions
from the same inputs. Every process loads the whole data set, deterministically (the same files and
seed), and the host computes the same global batch indices in each. What a process transfers is its
own share only (``distributed.put``, ``jax.make_array_from_callback``): of a step's batch indices,
the rows of the examples its own devices take (the index array is sharded like the batch); of the
splits, the copies on its own devices (the splits are replicated, so each device gathers its
examples locally and the gathered batch is sharded over all devices by the sharding constraint,
with no cross-process traffic for data). Parameters and metrics stay replicated, so each process
reads the metrics and finiteness flags from its own devices. Orbax saves and restores the state
from all processes into the one shared ``checkpoints/``; process 0 alone logs, holds the workdir
lock and writes ``metrics.jsonl``, ``summary.json`` and the plot, and the records it reads back on
resume are broadcast to the others. A SIGINT or SIGTERM to any process stops every process after the
same step (one small all-gather per call), and all save that step's checkpoint together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from maxl_jax import data as data_lib
from maxl_jax import config_checks, distributed, hierarchy, methods, parallel, validation
from maxl_jax.checkpoint import Checkpointer, CheckpointError
from maxl_jax.methods.base import Method
from maxl_jax.records import CLOCK as _CLOCK
from maxl_jax.run_guard import Interrupted, WorkdirLock  # noqa: F401  (train.WorkdirLock)
from maxl_jax.run_guard import fault as _fault, interrupt as _interrupt
from maxl_jax.run_guard import remove_if_empty as _remove_if_empty, workdir_lock as _workdir_lock
from maxl_jax.records import (append_record as _append_record, epoch_line as _epoch_line,
                              evaluates, read_clock as _read_clock, read_records as _read_records,
                              summarize, to_json as _to_json, write_atomic as _write_atomic,
                              write_records as _write_records)
from maxl_jax.train_state import TrainState

#: Fields of the config every method's trajectory depends on (part of every run's identity).
IDENTITY_FIELDS = ("dataset", "primary_level", "train_fraction", "method", "arch", "width",
                   "head_width", "batch_size", "seed", "lr", "decay_every", "gamma", "augment",
                   "max_steps_per_epoch")


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter became NaN or inf; the message names the step and quantity."""


class RunFilesError(RuntimeError):
    """A run's own file (``metrics.jsonl``, ``summary.json``) could not be written; the message
    says what was kept and how to go on."""


def random_auxiliary_labels(primary: np.ndarray, psi, seed: int, task: int = 0) -> np.ndarray:
    """Fixed random auxiliary labels: for each example, a uniform class inside its primary block
    (``task`` > 0 draws an independent labelling for a second random task)."""
    psi = np.asarray(hierarchy.validate_psi(psi))
    rng = np.random.default_rng([seed, 0xA0C] + ([task] if task else []))
    starts = hierarchy.block_starts(psi)
    return (starts[primary] + np.floor(rng.random(len(primary)) * psi[primary])).astype(np.int32)


def auxiliary_labels(method: Method, split: data_lib.Split, seed: int) -> np.ndarray | None:
    """``(N, T)`` int32 labels of the method's data-supplied auxiliary tasks, or ``None``."""
    if not method.aux_tasks:
        return None
    columns = []
    for t, task in enumerate(method.aux_tasks):
        if task.source == "human":
            columns.append(split.human_aux)
        else:
            columns.append(random_auxiliary_labels(split.primary, task.psi, seed, task=t))
    return np.stack(columns, axis=1).astype(np.int32)


def held_out_split(primary: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, held_idx)``: a stratified, seeded ``fraction`` of each primary class held out."""
    held = data_lib.stratified_subset(primary, fraction, seed=int(seed) + 7919)
    keep = np.ones(len(primary), bool)
    keep[held] = False
    return np.flatnonzero(keep), held


def setup_of(config, dataset: data_lib.Dataset, steps_per_epoch: int) -> methods.Setup:
    return methods.Setup(num_primary=dataset.num_primary, psi_human=dataset.psi_human,
                         steps_per_epoch=steps_per_epoch, dataset=dataset.name)


def run_identity(config, method: Method, held: dict | None = None) -> dict:
    """The settings a checkpoint must share with the run that resumes it: the shared trajectory
    fields, the shared fields the method reads, its own config, its tasks and hierarchy, and what
    the held-out split holds."""
    ident = {k: config.get(k) for k in IDENTITY_FIELDS}
    # The compute precision changes the trajectory: part of the identity, recorded only when it is
    # not the default, so checkpoints written before the setting existed (all float32) still resume.
    dtype, scale = config.get("dtype") or "float32", float(config.get("loss_scale") or 1.0)
    if dtype != "float32" or scale != 1.0:
        ident["dtype"], ident["loss_scale"] = dtype, scale
    ident.update({k: config.get(k) for k in type(method).config_fields})
    if method.name in config:
        ident[method.name] = config[method.name].to_dict()
    ident["aux_tasks"] = [[t.source, list(t.psi)] for t in method.aux_tasks]
    if getattr(method, "psi", None) is not None:
        ident["psi"] = list(method.psi)
    if held is not None:
        ident["held_out"] = held
    return json.loads(json.dumps(ident))


# ------------------------------------------------------------------------- compiled functions


def _is_finite_tree(tree) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _add_sums(sums: dict, kind: str, metrics: dict) -> dict:
    new = dict(sums)
    new[kind] = jax.tree_util.tree_map(lambda s, m: s + m.astype(s.dtype), sums[kind],
                                       {k: metrics[k] for k in sums[kind]})
    new[kind + "_count"] = sums[kind + "_count"] + 1
    return new


class _Compiled:
    """The compiled per-step functions of one run: gather by index, augment, step, accumulate."""

    def __init__(self, method: Method, mesh, augment: bool, compile_ahead: bool,
                 batch_size: int | None = None, steps_per_call: int = 1):
        self.method = method
        self.steps_per_call = steps_per_call
        rep = parallel.replicated(mesh)
        shard = parallel.data_sharded(mesh)
        batch_sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))
        sources = method.schedule.sources

        def gather(split, idx, key):
            """The batch of examples ``idx``; when ``idx`` is longer than ``batch_size`` (padded to a
            multiple of the device count) its tail is masked out."""
            batch = {k: v[idx] for k, v in split.items()}
            padded = key is not None and batch_size is not None and idx.shape[0] > batch_size
            batch["image"] = data_lib.preprocess(key, batch["image"], train=key is not None,
                                                 augment_train=augment,
                                                 valid=batch_size if padded else None)
            if padded:
                batch["mask"] = (jnp.arange(idx.shape[0]) < batch_size).astype(jnp.float32)
            return jax.lax.with_sharding_constraint(batch, batch_sharding)

        def finish(state, new, metrics, kind, checked):
            ok = jnp.logical_and(
                jnp.all(jnp.stack([jnp.all(jnp.isfinite(metrics[n])) for n in checked])),
                _is_finite_tree((new.multitask_params, new.multitask_batch_stats,
                                 new.method_state)))
            if state.sums:
                new = new.replace(sums=_add_sums(state.sums, kind, metrics))
            return new, metrics, ok

        def train_key(state, step):
            return jax.random.fold_in(jax.random.fold_in(state.rng, 1), step)

        def train(state, data, idx):
            new, m = method.train_step(state, gather(data["train"], idx,
                                                     train_key(state, state.step)))
            return finish(state, new, m, "train", method.train_checked)

        def meta(state, data, idx):
            key = jax.random.fold_in(jax.random.fold_in(state.rng, 2), state.meta_step)
            batches = {}
            for i, source in enumerate(sources):
                if source == "same":  # the batch of the training step just taken, as it was
                    batches[source] = gather(data["train"], idx[source],
                                             train_key(state, state.step - 1))
                else:
                    split = "held_out" if source == "held_out" else "train"
                    batches[source] = gather(data[split], idx[source],
                                             key if i == 0 else jax.random.fold_in(key, i))
            new, m = method.meta_step(state, batches)
            return finish(state, new, m, "meta", method.meta_checked)

        def evaluate(state, test, eval_idx):
            def body(acc, idx):
                sums = method.eval_step(state, gather(test, idx, None))
                return jax.tree_util.tree_map(jnp.add, acc, sums), None

            zero = {"correct": jnp.zeros(()), "loss_sum": jnp.zeros(()), "count": jnp.zeros(())}
            return jax.lax.scan(body, zero, eval_idx)[0]

        def chunked(step):
            """Up to ``steps_per_call`` steps of one kind in one call: a scan over the steps'
            stacked indices. A row whose ``valid`` flag is off (filling a chunk cut short by the
            epoch's end or a checkpoint) leaves the state as it is and reports ok."""
            def run(state, data, idx, valid):
                def body(s, x):
                    i, v = x
                    metrics_shape = jax.eval_shape(lambda s_, i_: step(s_, data, i_)[1], s, i)

                    def take(s):
                        new, m, ok = step(s, data, i)
                        return new, (m, ok)

                    def skip(s):
                        zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                       metrics_shape)
                        return s, (zeros, jnp.asarray(True))

                    return jax.lax.cond(v, take, skip, s)

                state, (metrics, ok) = jax.lax.scan(body, state, (idx, valid))
                return state, metrics, ok
            return run

        self._fns = {"train": train, "meta": meta, "evaluate": evaluate,
                     "train_chunk": chunked(train), "meta_chunk": chunked(meta)}
        if compile_ahead:
            stacked = NamedSharding(mesh, P(None, parallel.DATA_AXIS))
            self._fns = {
                "train": jax.jit(train, in_shardings=(rep, rep, shard), out_shardings=rep,
                                 donate_argnums=0),
                "meta": jax.jit(meta, in_shardings=(rep, rep, shard), out_shardings=rep,
                                donate_argnums=0),
                "evaluate": jax.jit(evaluate, in_shardings=(rep, rep, rep), out_shardings=rep),
                "train_chunk": jax.jit(self._fns["train_chunk"],
                                       in_shardings=(rep, rep, stacked, rep), out_shardings=rep,
                                       donate_argnums=0),
                "meta_chunk": jax.jit(self._fns["meta_chunk"],
                                      in_shardings=(rep, rep, stacked, rep), out_shardings=rep,
                                      donate_argnums=0),
            }
        self.compile_ahead = compile_ahead
        self._index_shardings = {1: shard, 2: NamedSharding(mesh, P(None, parallel.DATA_AXIS)),
                                 "rep": rep}
        self.train, self.meta, self.evaluate = (self._fns["train"], self._fns["meta"],
                                                self._fns["evaluate"])
        self.train_chunk, self.meta_chunk = self._fns["train_chunk"], self._fns["meta_chunk"]

    def compile(self, state, data, train_idx, meta_idx, test, eval_idx) -> float:
        """Compiles every step ahead of the loop (so timings exclude compilation); returns seconds.
        With ``steps_per_call`` > 1 the chunked programs are compiled instead of the single steps."""
        if not self.compile_ahead:
            return 0.0
        t = time.time()
        k = self.steps_per_call
        put = self._feed
        if k == 1:
            self.train = self._fns["train"].lower(state, data, put(train_idx)).compile()
            if self.method.has_meta:
                self.meta = self._fns["meta"].lower(state, data, put(meta_idx)).compile()
        else:
            valid = put(np.ones(k, bool))
            self.train_chunk = self._fns["train_chunk"].lower(
                state, data, put(_stack([train_idx] * k)), valid).compile()
            if self.method.has_meta:
                self.meta_chunk = self._fns["meta_chunk"].lower(
                    state, data, put(_stack([meta_idx] * k)), valid).compile()
        self.evaluate = self._fns["evaluate"].lower(state, test, eval_idx).compile()
        return time.time() - t

    def run(self, kind: str, state, data, indices: list):
        """Runs the steps of ``kind`` whose indices are ``indices`` (one per step, at most
        ``steps_per_call``): ``(state, metrics, ok)``, the metrics and ok flags stacked over the
        steps when ``steps_per_call`` > 1."""
        if self.steps_per_call == 1:
            assert len(indices) == 1
            return (self.train if kind == "train" else self.meta)(state, data,
                                                                  self._feed(indices[0]))
        k, n = self.steps_per_call, len(indices)
        padded = indices + [indices[-1]] * (k - n)
        valid = np.arange(k) < n
        fn = self.train_chunk if kind == "train" else self.meta_chunk
        return fn(state, data, self._feed(_stack(padded)), self._feed(valid))

    def _feed(self, tree):
        """A step's host indices (or ``valid`` flags) as its compiled call takes them: as they are in
        one process; with several, global arrays of which each process transfers only its devices'
        part (a batch's indices: the rows of its devices' examples)."""
        if not distributed.multi_process():
            return tree
        return jax.tree_util.tree_map(
            lambda x: distributed.put(x, self._index_shardings[np.ndim(x)] if np.dtype(x.dtype)
                                      != np.bool_ else self._index_shardings["rep"]), tree)

    def sums_template(self, state, data, train_idx, meta_idx) -> dict:
        """Zeroed running sums with the structure of the steps' metrics (float32)."""
        def zeros(kind, idx):
            shapes = jax.eval_shape(self._fns[kind], state.replace(sums={}), data, idx)[1]
            return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

        sums = {"train": zeros("train", train_idx), "train_count": jnp.zeros((), jnp.float32)}
        if self.method.has_meta:
            sums["meta"] = zeros("meta", meta_idx)
            sums["meta_count"] = jnp.zeros((), jnp.float32)
        return sums


def auto_steps_per_call() -> int:
    """``steps_per_call`` 0: one step per call on the CPU, where a step takes far longer than its
    dispatch and a signal is answered after each step; 20 on a GPU or TPU, where a step at the
    reference's batch is short enough for host round-trips to leave the device idle."""
    return 1 if jax.default_backend() == "cpu" else 20


def _stack(rows: list):
    """Stacks per-step indices (arrays, or dicts of arrays by data source) along a new first axis."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *rows)


def _epoch_order(num_examples: int, steps_per_epoch: int, batch_size: int, seed: int, epoch: int,
                 pass_id: int) -> np.ndarray:
    """The shuffled example indices of one pass, ``(steps_per_epoch, batch_size)``."""
    perm = np.random.default_rng([seed, epoch, pass_id]).permutation(num_examples)
    return perm[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size).astype(np.int32)


@dataclasses.dataclass
class _Orders:
    """Which examples each step of an epoch takes, per data source."""

    train: np.ndarray
    meta_train: np.ndarray
    held_out: np.ndarray | None
    last_train: dict  # meta index -> index of the training step just before it (None: none yet)
    random_train: np.ndarray | None = None  # an independent shuffle ("random_train" source)

    def meta_indices(self, sources, j: int) -> dict:
        out = {}
        for s in sources:
            if s == "same":
                out[s] = self.train[self.last_train[j]]
            elif s == "train":
                out[s] = self.meta_train[j % len(self.meta_train)]
            elif s == "random_train":
                out[s] = self.random_train[j % len(self.random_train)]
            else:
                out[s] = self.held_out[j % len(self.held_out)]
        return out


# ------------------------------------------------------------------------------- the loop


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def train_and_evaluate(config, workdir: str | pathlib.Path, *, xla: bool = True,
                       progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its checkpoint) and returns the summary.

    Args:
      config: an ``ml_collections.ConfigDict`` as in ``experiments/configs/default.py``.
      workdir: the run's directory; made if absent.
      xla: compile the steps with XLA over all local devices; ``False`` runs the same code
        op by op (``jax.disable_jit``) for debugging.
      progress: show progress bars.

    With several processes every process calls this with the same ``config`` and ``workdir`` (a
    folder all of them reach); process 0 alone logs, shows progress and writes the files beside
    the checkpoints (see the module's docstring).

    Raises:
      Interrupted: on SIGINT / SIGTERM, after saving a checkpoint.
      NonFiniteError: when a checked quantity becomes NaN or inf (the last finite checkpoint kept).
    """
    config_checks.validate_config(config)
    workdir = pathlib.Path(workdir).expanduser().absolute()
    primary = distributed.is_primary()
    if distributed.multi_process() and not xla:
        raise validation.ConfigError(
            f"a run of {jax.process_count()} processes needs the compiled steps: drop --noxla (it "
            f"runs op by op, one process only)")
    if not primary:  # process 0 logs and holds the workdir lock for all
        log, progress = (lambda s: None), False
    created = primary and not workdir.exists()
    try:
        with _workdir_lock(workdir):
            if not xla:
                with jax.disable_jit():
                    return _train(config, workdir, progress, log, compile_ahead=False)
            return _train(config, workdir, progress, log, compile_ahead=True)
    except BaseException:
        if created:
            _remove_if_empty(workdir)
        raise


def _load_dataset(config) -> data_lib.Dataset:
    def load():
        return data_lib.load_dataset(config.dataset, data_dir=config.get("data_dir") or None,
                                     primary_level=config.get("primary_level") or None,
                                     train_fraction=config.train_fraction, seed=config.seed,
                                     download=config.get("download", False),
                                     eval_split=config.get("eval_split", "test"),
                                     validation_size=config.get("validation_size", 5000))

    if distributed.multi_process() and config.get("download", False):
        # Process 0 downloads first, so that a data_dir the hosts share is fetched once (and no two
        # processes write one partial file); the others then find it, or fetch their own copy.
        dataset = distributed.primary_first(load)
        return dataset if distributed.is_primary() else load()
    return load()


@dataclasses.dataclass
class _Run:
    """What a run's epochs need, built once from its config by ``_prepare``: the data on the
    devices, the method and its epoch's events, the compiled steps and the checkpointer."""

    config: Any
    workdir: pathlib.Path
    method: Method
    events: list
    steps_per_epoch: int
    n_train: int
    held_split: Any
    padded_batch: int
    rep: Any
    data: dict
    test: Any
    eval_idx: Any
    compiled: _Compiled
    steps_per_call: int
    zero_sums: Any
    example_train: Any
    example_meta: dict
    ckpt: Checkpointer


def _prepare(config, workdir: pathlib.Path, log, compile_ahead: bool) -> tuple[_Run, TrainState]:
    """The run's data, method, compiled steps and checkpointer, and its fresh initial state."""
    dataset = _load_dataset(config)
    mesh = parallel.make_mesh()
    n_dev = mesh.devices.size
    # A batch the devices do not divide is padded to the next multiple and the padding masked out.
    padded_batch = -(-config.batch_size // n_dev) * n_dev
    method_cls = methods.get(config.method)

    train_split, held_split, held_ident = dataset.train, None, None
    fraction = method_cls.held_out_fraction_of(config)
    if fraction:
        train_idx, held_idx = held_out_split(dataset.train.primary, fraction, config.seed)
        train_split, held_split = dataset.train.subset(train_idx), dataset.train.subset(held_idx)
        held_ident = {"fraction": fraction, "count": int(len(held_idx)),
                      "sha256": hashlib.sha256(np.sort(held_idx).astype(np.int64).tobytes())
                      .hexdigest()[:16]}
        if len(held_idx) < config.batch_size:
            raise ValueError(
                f"the held-out split ({fraction:g} of {len(dataset.train)} training examples) holds "
                f"{len(held_idx)} examples, fewer than one batch of {config.batch_size}: raise the "
                f"held-out fraction or lower batch_size")
    n_train = len(train_split)
    steps_per_epoch = n_train // config.batch_size
    if config.get("max_steps_per_epoch"):
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"the training split has {n_train} examples, fewer than one batch of "
                         f"{config.batch_size}: lower batch_size")
    method = methods.build(config, setup_of(config, dataset, steps_per_epoch))
    schedule = method.schedule
    events = schedule.events(steps_per_epoch)
    if schedule.has_meta and not schedule.meta_steps_per_epoch(steps_per_epoch):
        raise ValueError(
            f"method {method.name!r} takes a meta step every {schedule.every} training steps but an "
            f"epoch has {steps_per_epoch}: it would never run. Lower "
            f"--config.{method.name}.every to at most {steps_per_epoch}.")

    rep = parallel.replicated(mesh)
    data = {"train": _device_split(train_split, method, config.seed, rep)}
    if held_split is not None:
        data["held_out"] = _device_split(held_split, method, config.seed, rep)
    test, eval_idx = _test_data(dataset, config.eval_batch_size, n_dev, rep)

    steps_per_call = int(config.get("steps_per_call") or 0) or auto_steps_per_call()
    if not compile_ahead:
        steps_per_call = 1
    compiled = _Compiled(method, mesh, config.augment, compile_ahead, config.batch_size,
                         steps_per_call)
    if padded_batch != config.batch_size:
        log(f"Batch {config.batch_size} over {n_dev} devices: each step's batch is padded to "
            f"{padded_batch}, the {padded_batch - config.batch_size} padding examples masked out of "
            f"every mean and BatchNorm statistic.")
    state = method.init(jax.random.PRNGKey(config.seed), dataset.image_shape)
    state = distributed.put(jax.device_get(state) if distributed.multi_process() else state, rep)
    example_train = np.zeros(padded_batch, np.int32)
    example_meta = {s: example_train for s in schedule.sources}
    zero_sums = jax.device_get(compiled.sums_template(state, data, example_train, example_meta))
    state = state.replace(sums=distributed.put(zero_sums, rep))
    ckpt = Checkpointer(workdir / "checkpoints", run_identity(config, method, held_ident),
                        config.keep_checkpoints)
    run = _Run(config, workdir, method, events, steps_per_epoch, n_train, held_split,
               padded_batch, rep, data, test, eval_idx, compiled, steps_per_call, zero_sums,
               example_train, example_meta, ckpt)
    return run, state


def _restore(run: _Run, state: TrainState, log) -> tuple[TrainState, int, int]:
    """The newest (or ``resume_step``'s) checkpoint's state if there is one, and its position in
    the run: ``(state, start_epoch, offset)``, ``offset`` the events of ``start_epoch`` done."""
    config, ckpt = run.config, run.ckpt
    if ckpt.latest_step() is None and config.get("resume_step"):
        raise CheckpointError(
            f"--config.resume_step={config.resume_step} asks to resume from the checkpoint of step "
            f"{config.resume_step}, but {ckpt.directory} holds no checkpoint: drop "
            f"--config.resume_step to start this run, or point --workdir at the run to resume")
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state, step=config.get("resume_step") or None,
                             fallback=bool(config.get("resume_from_intact", False)), log=log)
        log(f"Resumed from {ckpt.directory}: step {int(state.step)}, meta step "
            f"{int(state.meta_step)}")
    start_epoch, offset = divmod(int(state.step) + int(state.meta_step), len(run.events))
    expected = start_epoch * run.steps_per_epoch + sum(k == "train" for k, _ in run.events[:offset])
    if int(state.step) != expected:
        raise CheckpointError(
            f"the checkpoint in {ckpt.directory} is at step {int(state.step)}, meta step "
            f"{int(state.meta_step)}, which is not a position in this run's schedule; it is left "
            f"untouched: use another --workdir")
    return state, start_epoch, offset


def _train(config, workdir: pathlib.Path, progress: bool, log, compile_ahead: bool) -> dict:
    run, state = _prepare(config, workdir, log, compile_ahead)
    state, start_epoch, offset = _restore(run, state, log)
    driver = _EpochDriver(run, state, start_epoch, offset, progress, log)
    driver.reconcile_records()
    if start_epoch >= config.epochs:
        pruned = run.ckpt.prune()
        if pruned:
            log(f"Deleted {len(pruned)} checkpoint(s) beyond --config.keep_checkpoints="
                f"{run.ckpt.keep} that an interrupted pruning had left: steps {pruned}")
        run.ckpt.close()
        return _complete(config, workdir, driver.records, driver.state, run.steps_per_epoch, log,
                         run.method)
    run.ckpt.ensure_writable()
    t_compile = run.compiled.compile(driver.state, run.data, run.example_train, run.example_meta,
                                     run.test, run.eval_idx)
    if t_compile:
        log(f"Compiled the steps in {t_compile:.1f} s")
    return driver.train()


class _EpochDriver:
    """The run's epochs from its restored position: each epoch's calls of the compiled steps, the
    non-finite checks (one call behind, so the host stays ahead), the checkpoints with the epoch's
    clock, the epoch records, and the stop on SIGINT / SIGTERM (a checkpoint first).

    The position in the run is the state's counters; the records are those of ``metrics.jsonl``
    before the restored epoch (process 0's, broadcast: every process takes the same decisions)."""

    def __init__(self, run: _Run, state: TrainState, start_epoch: int, offset: int,
                 progress: bool, log):
        self.run, self.config, self.method = run, run.config, run.method
        self.state, self.start_epoch, self.offset = state, start_epoch, offset
        self.progress, self.log = progress, log
        self.metrics_path = run.workdir / "metrics.jsonl"
        self.primary = distributed.is_primary()
        self.records = distributed.broadcast_json(distributed.primary_first(
            lambda: _read_records(self.metrics_path, keep_before=start_epoch)))
        self.pending = None  # the last call's (kind, counter, metrics, finite flags, steps)
        self.counters = {"train": int(state.step), "meta": int(state.meta_step)}
        self.epoch = start_epoch
        self.signal = None
        self.every_events = int(self.config.get("checkpoint_every_steps") or 0)
        # The current epoch's clock: training time and images so far, carried over a resume
        # through a small file written beside each checkpoint (``_CLOCK``), so a resumed epoch's
        # time and throughput are the whole epoch's.
        self.clock = {"start": time.time(), "prior": 0.0, "trained": 0, "epoch": start_epoch}
        carried = _read_clock(run.workdir, int(state.step) + int(state.meta_step), start_epoch)
        if offset and carried is not None:
            self.clock["prior"], self.clock["trained"] = carried
        # A resumed epoch whose earlier part's clock was not saved (a kill between a checkpoint
        # and its clock): its time and throughput cover this process's part only, and its record
        # says so.
        self.partial_clock = bool(offset) and carried is None

    # ------------------------------------------------------------------------------ records
    def finish_epoch(self, epoch: int, epoch_time, images_per_sec) -> dict:
        """The record of ``epoch`` from the state's running sums, evaluated when it is due."""
        run, state = self.run, self.state
        sums = jax.device_get(state.sums)
        means = {kind: _means(sums[kind], sums[kind + "_count"])
                 for kind in ("train", "meta") if kind in sums and sums[kind + "_count"] > 0}
        record: dict[str, Any] = {"epoch": epoch, **means}
        if evaluates(epoch, self.config):
            test_sums = run.compiled.evaluate(state, run.test, run.eval_idx)
            _fault("eval", epoch + 1)
            test_sums = jax.device_get(test_sums)
            record["test"] = {"accuracy": float(test_sums["correct"] / test_sums["count"]),
                              "loss": float(test_sums["loss_sum"] / test_sums["count"])}
        record.update(self.method.epoch_summary(means))
        record["epoch_time"] = epoch_time
        record["train_images_per_sec"] = images_per_sec
        return _to_json(record)

    def reconcile_records(self) -> None:
        """Rebuilds the record of an epoch whose last step was checkpointed but whose record was
        never written, rewrites ``metrics.jsonl`` to the records kept, and warns of lost ones."""
        records, start = self.records, self.start_epoch
        if self.offset == 0 and start > 0 and (not records or records[-1]["epoch"] != start - 1):
            # Rebuilt from the checkpoint: its sums and its final parameters.
            records.append(self.finish_epoch(start - 1, None, None))
            self.log(f"Rebuilt the record of epoch {start} from the checkpoint")
        if self.primary:
            _write_records(self.metrics_path, records)
        lost = sorted(set(range(start)) - {r["epoch"] for r in records})
        if lost:
            self.log(f"Warning: {self.metrics_path} has no record of epoch(s) "
                     f"{[e + 1 for e in lost]} (the file was edited or deleted); they cannot be "
                     f"rebuilt, and summary.json will list them as missing.")

    # ------------------------------------------------------------------- checks and checkpoints
    def check(self, pending) -> None:
        if pending is not None and not bool(np.all(jax.device_get(pending[3]))):
            _raise_non_finite(pending, self.method, self.epoch)

    def save(self) -> None:
        """The state's checkpoint (never one derived from a non-finite step) and the clock."""
        self.check(self.pending)
        step = self.counters["train"] + self.counters["meta"]
        self.run.ckpt.save(step, self.state)
        if self.primary:
            try:  # timings only: a resumed epoch without it says its time is partial
                _write_atomic(self.run.workdir / _CLOCK, json.dumps({
                    "step": step, "epoch": self.clock["epoch"], "trained": self.clock["trained"],
                    "elapsed_s": self.clock["prior"] + time.time() - self.clock["start"]}))
            except OSError:
                pass
        _fault("saved", step)

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum

    def _stop_if_signalled(self) -> None:
        signum = distributed.agreed_signal(self.signal)
        if signum is not None:
            raise _interrupt(signum)

    # ---------------------------------------------------------------------------------- epochs
    def run_epoch(self, epoch: int) -> None:
        run, config, events = self.run, self.config, self.run.events
        self.epoch = epoch
        first = self.offset if epoch == self.start_epoch else 0
        if first == 0:  # a fresh copy: the steps donate the state, sums included
            self.state = self.state.replace(sums=distributed.put(run.zero_sums, run.rep))
        order = self.orders(epoch)
        bar = _progress(len(events), f"epoch {epoch + 1}/{config.epochs}", self.progress)
        if bar is not None:
            bar.update(first)
        t_epoch = time.time()
        if epoch != self.start_epoch:
            self.clock.update(prior=0.0, trained=0)
        self.clock.update(start=t_epoch, epoch=epoch)
        schedule, every, per_call = self.method.schedule, self.every_events, run.steps_per_call
        e = first
        while e < len(events):
            # The next call: consecutive steps of one kind, at most steps_per_call, ending where a
            # checkpoint is due.
            kind, end = events[e][0], e + 1
            while (end < min(len(events), e + per_call) and events[end][0] == kind
                   and not (every and (epoch * len(events) + end) % every == 0)):
                end += 1
            indices = [order.train[i] if kind == "train" else
                       order.meta_indices(schedule.sources, i) for _, i in events[e:end]]
            self.state, m, ok = run.compiled.run(kind, self.state, run.data, indices)
            n = end - e
            self.check(self.pending)  # the previous call's, so the host stays one call ahead
            self.pending = (kind, self.counters[kind] + 1, m, ok, n if per_call > 1 else None)
            self.counters[kind] += n
            self.clock["trained"] += n if kind == "train" else 0
            if bar is not None:
                bar.update(n)
            if every and (epoch * len(events) + end) % every == 0:
                self.save()
            for g in range(e, end):
                _fault("event", epoch * len(events) + g + 1)
            e = end
            self._stop_if_signalled()
        self.check(self.pending)
        if bar is not None:
            bar.close()
        elapsed = self.clock["prior"] + time.time() - t_epoch
        record = self.finish_epoch(epoch, elapsed,
                                   self.clock["trained"] * config.batch_size / max(elapsed, 1e-9))
        if epoch == self.start_epoch and self.partial_clock:
            record["epoch_time_partial"] = True
        self.records.append(record)
        if self.primary:
            try:
                _append_record(self.metrics_path, record)
            except OSError as e:
                self.save()  # the epoch is kept: a resume rebuilds its record
                raise RunFilesError(
                    f"cannot write {self.metrics_path} ({type(e).__name__}: {e}). Training "
                    f"stopped after epoch {epoch + 1}, whose checkpoint is saved in "
                    f"{run.ckpt.directory}. Fix the file's permissions or free disk space, then "
                    f"run the same command: it resumes and rebuilds the missing record.") from None
        _fault("record", epoch + 1)
        self.log(_epoch_line(record, config.epochs, self.method))
        self.save()
        self._stop_if_signalled()

    def train(self) -> dict:
        """Every remaining epoch, then the summary; a signal or Ctrl-C saves a checkpoint first and
        raises ``Interrupted``."""
        run, config, ckpt = self.run, self.config, self.run.ckpt
        self.orders = _order_maker(run.n_train, run.held_split, run.steps_per_epoch, config,
                                   self.method.schedule, run.padded_batch)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            for epoch in range(self.start_epoch, config.epochs):
                self.run_epoch(epoch)
        except KeyboardInterrupt as interrupt:
            signum = getattr(interrupt, "signum", signal.SIGINT)
            try:
                self.save()
                where = (f"saved a checkpoint at step {int(self.state.step)}, meta step "
                         f"{int(self.state.meta_step)} in {ckpt.directory}")
            except (NonFiniteError, RuntimeError, ValueError) as e:
                where = f"the last checkpoint in {ckpt.directory} is kept ({type(e).__name__})"
            ckpt.close()
            raise Interrupted(signum, f"Interrupted: {where}; run the same command to "
                                      f"resume.") from None
        except BaseException:
            ckpt.close()
            raise
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
        ckpt.close()
        return _finish(config, run.workdir, self.records, self.state, run.steps_per_epoch,
                       self.method)


def _order_maker(n_train, held_split, steps_per_epoch, config, schedule, padded_batch=None):
    """``epoch -> _Orders``: the batches of every step of an epoch, from the seed (each row padded
    with example 0 to ``padded_batch`` when that is larger than the batch size)."""
    last_train, j, t = {}, 0, None
    for kind, i in schedule.events(steps_per_epoch):
        if kind == "train":
            t = i
        else:
            last_train[j] = t
            j += 1
    n_held_batches = 0 if held_split is None else len(held_split) // config.batch_size

    def pad(order):
        extra = (padded_batch or config.batch_size) - config.batch_size
        return order if order is None or not extra else np.pad(order, ((0, 0), (0, extra)))

    def orders(epoch: int) -> _Orders:
        held = None
        if n_held_batches:
            held = _epoch_order(len(held_split), n_held_batches, config.batch_size, config.seed,
                                epoch, 2)
        return _Orders(
            train=pad(_epoch_order(n_train, steps_per_epoch, config.batch_size, config.seed,
                                   epoch, 0)),
            meta_train=pad(_epoch_order(n_train, steps_per_epoch, config.batch_size, config.seed,
                                        epoch, 1)),
            held_out=pad(held), last_train=last_train,
            random_train=(pad(_epoch_order(n_train, steps_per_epoch, config.batch_size,
                                           config.seed, epoch, 3))
                          if "random_train" in schedule.sources else None))

    return orders


def _device_split(split: data_lib.Split, method: Method, seed: int, sharding) -> dict:
    arrays = {"image": split.images, "primary": split.primary.astype(np.int32)}
    aux = auxiliary_labels(method, split, seed)
    if aux is not None:
        arrays["aux"] = aux
    return distributed.put(arrays, sharding)


def _test_data(dataset, eval_batch_size: int, n_dev: int, sharding):
    """The test split padded to whole evaluation batches (``mask`` 0 on padding), and the batches'
    indices ``(n_batches, eval_bs)``."""
    eval_bs = max(n_dev, (eval_batch_size // n_dev) * n_dev)
    n_test = len(dataset.test)
    n_batches = math.ceil(n_test / eval_bs)
    pad = n_batches * eval_bs - n_test
    test = distributed.put({
        "image": np.concatenate([dataset.test.images,
                                 np.zeros((pad, *dataset.image_shape), np.uint8)]),
        "primary": np.concatenate([dataset.test.primary, np.zeros(pad, np.int32)]).astype(np.int32),
        "mask": np.concatenate([np.ones(n_test, np.float32), np.zeros(pad, np.float32)]),
    }, sharding)
    eval_idx = np.arange(n_batches * eval_bs, dtype=np.int32).reshape(n_batches, eval_bs)
    if distributed.multi_process():  # a jitted call takes global arrays only
        eval_idx = distributed.put(eval_idx, sharding)
    return test, eval_idx


def _means(sums: dict, count) -> dict:
    """Epoch means of the summed metrics (totals for keys ending in ``_sum`` or ``_count``)."""
    count = float(count)
    return {k: (np.asarray(v) if k.endswith(("_sum", "_count")) else np.asarray(v) / count)
            for k, v in sums.items()}


def _raise_non_finite(pending, method: Method, epoch: int):
    kind, counter, metrics, ok, stacked = pending
    metrics = jax.device_get(metrics)
    if stacked:  # a chunk of steps: name its first non-finite one
        first_bad = int(np.argmin(np.asarray(jax.device_get(ok))[:stacked]))
        counter += first_bad
        metrics = jax.tree_util.tree_map(lambda x: np.asarray(x)[first_bad], metrics)
    names = method.train_checked if kind == "train" else method.meta_checked
    bad = {n: float(np.asarray(metrics[n]).ravel()[0]) for n in names
           if not np.all(np.isfinite(np.asarray(metrics[n])))}
    what = ", ".join(f"{n}={v}" for n, v in bad.items()) or "parameters or BatchNorm statistics"
    meta_rate = _meta_rate_flag(method)
    if kind == "train":
        rates = "the learning rate (--config.lr)"
        if method.has_meta:
            rates += (f" or the meta step's ({meta_rate}: what the meta step learns enters every "
                      f"training step)")
    else:
        rates = f"the meta step's learning rate ({meta_rate})"
    raise NonFiniteError(
        f"non-finite {what} at {kind} step {counter} (epoch {epoch + 1}); training stopped and the "
        f"last finite checkpoint kept. Lower {rates}, or check the input data.")


def _meta_rate_flag(method: Method) -> str:
    """The flag of the rate a method's meta step learns at."""
    fields = type(method).defaults()
    for field in ("meta_lr", "ppo_lr"):
        if field in fields:
            return f"--config.{method.name}.{field}"
    return "--config.generator_lr"


def _finish(config, workdir, records, state, steps_per_epoch, method=None) -> dict:
    summary = summarize(records, config, steps_per_epoch, method)
    if distributed.is_primary():
        try:
            _write_atomic(workdir / "summary.json", json.dumps(summary, indent=2))
        except OSError as e:
            raise RunFilesError(
                f"cannot write {workdir / 'summary.json'} ({type(e).__name__}: {e}). Training is "
                f"complete and its checkpoint saved; fix the folder's permissions or free disk "
                f"space, then run the same command to write the summary.") from None
        plot_learning_curves(records, workdir / "learning_curves.png",
                             methods.get(config.method).report,
                             title=f"{config.method} on {config.dataset} ({config.arch})")
    summary["state"] = state
    return summary


def _complete(config, workdir, records, state, steps_per_epoch, log, method=None) -> dict:
    """A run that has already done its epochs: say so and change nothing (the summary is only
    written when absent)."""
    path = workdir / "summary.json"
    if distributed.is_primary() and path.exists():
        summary = json.loads(path.read_text())
    else:
        summary = _finish(config, workdir, records, state, steps_per_epoch, method)
        summary.pop("state")
    log(f"The run in {workdir} is complete ({len(records)} of {config.epochs} epochs done): nothing "
        f"to train. Raise --config.epochs to train further.")
    summary["state"] = state
    summary["already_complete"] = True
    return summary


def new_figure(figsize):
    """A matplotlib Figure on its own Agg canvas: drawn and saved without pyplot, so no backend is
    chosen and no global figure is left open; a notebook displays the Figure returned."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_learning_curves(records: list[dict], path: pathlib.Path | None, report=(),
                         title: str = ""):
    """Train/test loss and accuracy per epoch, and the method's meta-step quantities: saved as a PNG
    at ``path`` (None: not saved) and returned as a matplotlib Figure (None without records)."""
    from matplotlib.ticker import MaxNLocator

    if not records:
        return None
    nan = float("nan")

    def get(r, part, key):
        return (r.get(part) or {}).get(key, nan)

    epochs = [r["epoch"] + 1 for r in records]
    has_meta = any(r.get("meta") for r in records) and report
    fig = new_figure((15 if has_meta else 10, 4))
    axes = fig.subplots(1, 3 if has_meta else 2)
    ax = axes[0]
    ax.plot(epochs, [get(r, "train", "primary_loss") for r in records], label="train primary")
    ax.plot(epochs, [get(r, "test", "loss") for r in records], ".-", label="test primary")
    ax.set(xlabel="epoch", ylabel="focal loss", title="loss")
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [get(r, "train", "accuracy") for r in records], label="train")
    ax.plot(epochs, [get(r, "test", "accuracy") for r in records], ".-", label="test")
    ax.set(xlabel="epoch", ylabel="primary accuracy", title="accuracy")
    ax.legend()
    if has_meta:
        ax = axes[2]
        for key, label in report:
            ax.plot(epochs, [get(r, "meta", key) for r in records], label=label)
        ax.set(xlabel="epoch", title="meta step")
        ax.legend()
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig

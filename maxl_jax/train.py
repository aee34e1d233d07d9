"""The training loop: data on the devices, the reference's two-pass epoch, checkpoints, logs, plots.

``train_and_evaluate(config, workdir)`` runs one experiment. Each split is held as arrays on the
devices; a compiled step gathers its batch by index, augments and normalises it inside XLA (keys from
the seed and the step counters), and runs the pure step from ``maxl_jax.steps``. So a run is
reproducible from its seed, and a run resumed from any checkpoint ends with the same parameters as an
uninterrupted one.

Per epoch (as the reference): pass A, one theta1 step per batch; pass B (``maxl`` only), a fresh
shuffle and one theta2 meta step per batch; then the primary head is evaluated on the test set.
Written to the workdir: ``checkpoints/``, ``metrics.jsonl`` (one line per epoch), ``summary.json`` and
``learning_curves.png``.
"""

from __future__ import annotations

import json
import math
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from maxl_jax import data as data_lib
from maxl_jax import hierarchy, maxl, models, parallel, steps
from maxl_jax.checkpoint import Checkpointer
from maxl_jax.train_state import TrainState


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or inf; the message names the step and the quantity."""


# Quantities checked for finiteness after every step, by pass.
_CHECKED = {
    "theta1": ("loss", "primary_loss", "auxiliary_loss", "grad_norm", "update_norm"),
    "theta2": ("meta_loss", "primary_after", "entropy_term", "grad_norm", "update_norm"),
}


def random_auxiliary_labels(primary: np.ndarray, psi, seed: int) -> np.ndarray:
    """Fixed random auxiliary labels: for each example, a uniform class inside its primary block."""
    psi = np.asarray(hierarchy.validate_psi(psi))
    rng = np.random.default_rng([seed, 0xA0C])
    starts = hierarchy.block_starts(psi)
    return (starts[primary] + np.floor(rng.random(len(primary)) * psi[primary])).astype(np.int32)


def resolve_psi(config, dataset: data_lib.Dataset) -> tuple[int, ...]:
    """The hierarchy of the run: the dataset's fine labels for ``human``, else ``config.psi`` (or
    ``config.aux_per_class`` auxiliary classes for each primary class)."""
    if config.method == "human":
        if dataset.psi_human is None:
            raise ValueError(
                f"method 'human' needs a dataset with fine labels (cifar100, fashion_mnist_coarse); "
                f"{dataset.name!r} has none")
        return tuple(dataset.psi_human)
    if config.get("psi"):
        return hierarchy.validate_psi(list(config.psi), dataset.num_primary)
    return (int(config.aux_per_class),) * dataset.num_primary


def build_trainer(config, dataset: data_lib.Dataset, steps_per_epoch: int):
    """The ``steps.Maxl`` of ``config`` for ``dataset``."""
    psi = resolve_psi(config, dataset)
    multitask, generator = models.make_networks(
        config.arch, dataset.num_primary, sum(psi), sum(psi), conv_impl=config.conv_impl,
        width=config.get("width") or None, head_width=config.get("head_width") or None)
    f_opt, g_opt, inner_lr = steps.reference_optimizers(
        steps_per_epoch, config.lr, config.generator_lr, config.weight_decay, config.decay_every)
    if config.inner_lr != config.lr:
        inner_lr = steps.step_lr_schedule(config.inner_lr, steps_per_epoch, config.decay_every)
    return steps.Maxl(multitask, generator, psi, config.method, f_opt, g_opt, inner_lr=inner_lr,
                      inner_steps=config.inner_steps, entropy_weight=config.entropy_weight,
                      aux_weight=config.aux_weight, gamma=config.gamma, meta_form=config.meta_form)


def run_identity(config, psi) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    keys = ("dataset", "primary_level", "train_fraction", "method", "arch", "width", "head_width",
            "batch_size", "seed", "inner_steps", "meta_form", "max_steps_per_epoch")
    ident = {k: config.get(k) for k in keys}
    ident["psi"] = list(psi)
    return json.loads(json.dumps(ident))


class _Passes:
    """The compiled per-batch functions of one run (gather by index, augment, step)."""

    def __init__(self, trainer: steps.Maxl, mesh, augment: bool):
        self.trainer = trainer
        self.mesh = mesh
        rep = parallel.replicated(mesh)
        shard = parallel.data_sharded(mesh)
        batch_sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))

        def batch_of(data, idx, key, train):
            batch = jax.tree_util.tree_map(lambda a: a[idx], data)
            batch["image"] = data_lib.preprocess(key, batch["image"], train=train,
                                                 augment_train=augment)
            return jax.lax.with_sharding_constraint(batch, batch_sharding)

        def finite(metrics, names):
            return jnp.all(jnp.stack([jnp.all(jnp.isfinite(metrics[n])) for n in names]))

        def theta1(state, data, idx):
            key = jax.random.fold_in(jax.random.fold_in(state.rng, 1), state.step)
            state, m = trainer.theta1_step(state, batch_of(data, idx, key, True))
            return state, {**m, "finite": finite(m, _CHECKED["theta1"])}

        def theta2(state, data, idx):
            key = jax.random.fold_in(jax.random.fold_in(state.rng, 2), state.meta_step)
            state, m = trainer.theta2_step(state, batch_of(data, idx, key, True))
            return state, {**m, "finite": finite(m, _CHECKED["theta2"])}

        def evaluate(state, data, idx):
            batch = jax.tree_util.tree_map(lambda a: a[idx], data)
            batch["image"] = data_lib.preprocess(None, batch["image"], train=False)
            return trainer.eval_step(state, jax.lax.with_sharding_constraint(batch, batch_sharding))

        self.theta1 = jax.jit(theta1, in_shardings=(rep, rep, shard), out_shardings=(rep, rep),
                              donate_argnums=0)
        self.theta2 = jax.jit(theta2, in_shardings=(rep, rep, shard), out_shardings=(rep, rep),
                              donate_argnums=0)
        self.evaluate = jax.jit(evaluate, in_shardings=(rep, rep, shard), out_shardings=rep)


def _epoch_order(num_examples: int, steps_per_epoch: int, batch_size: int, seed: int, epoch: int,
                 pass_id: int) -> np.ndarray:
    """The shuffled example indices of one pass, ``(steps_per_epoch, batch_size)``."""
    perm = np.random.default_rng([seed, epoch, pass_id]).permutation(num_examples)
    return perm[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size).astype(np.int32)


def _raise_non_finite(metrics: dict, names, pass_name: str, step: int, epoch: int):
    bad = {n: float(np.asarray(metrics[n])) for n in names
           if not np.all(np.isfinite(np.asarray(metrics[n])))}
    what = ", ".join(f"{n}={v}" for n, v in bad.items())
    raise NonFiniteError(
        f"non-finite {what} at {pass_name} step {step} (epoch {epoch}); training stopped and the "
        f"last checkpoint kept. Lower the learning rate or check the input data.")


def _mean_metrics(history: list[dict]) -> dict:
    """Per-pass summary: sums for the label-count arrays, means for everything else."""
    if not history:
        return {}
    host = jax.device_get(history)
    out = {}
    for key in host[0]:
        if key == "finite":
            continue
        values = np.stack([np.asarray(h[key], np.float64) for h in host])
        out[key] = values.sum(0) if key in ("soft_label_sum", "primary_count",
                                            "label_entropy_sum") else values.mean(0)
    return out


def _to_json(x):
    if isinstance(x, dict):
        return {k: _to_json(v) for k, v in x.items()}
    arr = np.asarray(x)
    return arr.item() if arr.ndim == 0 else arr.tolist()


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
    """
    workdir = pathlib.Path(workdir).expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if not xla:
        with jax.disable_jit():
            return _train(config, workdir, progress, log)
    return _train(config, workdir, progress, log)


def _train(config, workdir: pathlib.Path, progress: bool, log) -> dict:
    t_start = time.time()
    dataset = data_lib.load_dataset(config.dataset, data_dir=config.get("data_dir") or None,
                                    primary_level=config.get("primary_level") or None,
                                    train_fraction=config.train_fraction, seed=config.seed,
                                    download=config.get("download", False))
    mesh = parallel.make_mesh()
    n_dev = mesh.devices.size
    parallel.check_batch_size(config.batch_size, n_dev)
    n_train = len(dataset.train)
    steps_per_epoch = n_train // config.batch_size
    if config.get("max_steps_per_epoch"):
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"the training split has {n_train} examples, fewer than one batch of "
                         f"{config.batch_size}: lower batch_size")
    trainer = build_trainer(config, dataset, steps_per_epoch)
    psi = trainer.psi
    maxl_method = trainer.has_generator

    if config.method == "human":
        aux = dataset.train.human_aux
    elif config.method == "random":
        aux = random_auxiliary_labels(dataset.train.primary, psi, config.seed)
    else:
        aux = np.zeros(n_train, np.int32)
    rep = parallel.replicated(mesh)
    train_data = jax.device_put({"image": dataset.train.images, "primary": dataset.train.primary,
                                 "aux": aux.astype(np.int32)}, rep)
    eval_bs = max(n_dev, (config.eval_batch_size // n_dev) * n_dev)
    n_test = len(dataset.test)
    n_eval_batches = math.ceil(n_test / eval_bs)
    pad = n_eval_batches * eval_bs - n_test
    test_data = jax.device_put({
        "image": np.concatenate([dataset.test.images,
                                 np.zeros((pad, *dataset.image_shape), np.uint8)]),
        "primary": np.concatenate([dataset.test.primary, np.zeros(pad, np.int32)]).astype(np.int32),
        "mask": np.concatenate([np.ones(n_test, np.float32), np.zeros(pad, np.float32)]),
    }, rep)
    eval_idx = np.arange(n_eval_batches * eval_bs, dtype=np.int32).reshape(n_eval_batches, eval_bs)

    passes = _Passes(trainer, mesh, config.augment)
    state = jax.device_put(trainer.init(jax.random.PRNGKey(config.seed), dataset.image_shape), rep)
    ckpt = Checkpointer(workdir / "checkpoints", run_identity(config, psi), config.keep_checkpoints)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        log(f"Resumed from {ckpt.directory}/{ckpt.latest_step()}: theta1 step "
            f"{int(state.step)}, theta2 step {int(state.meta_step)}")

    metrics_path = workdir / "metrics.jsonl"
    counter = int(state.meta_step) if maxl_method else int(state.step)
    start_epoch = counter // steps_per_epoch
    records = _read_records(metrics_path, keep_before=start_epoch)
    _write_records(metrics_path, records)

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_signal) if _main_thread() else None
    step_interval = int(config.get("checkpoint_every_steps") or 0)
    last_saved = [None]

    def save(s: TrainState):
        n = int(s.step) + int(s.meta_step)
        ckpt.save(n, s)
        last_saved[0] = n

    try:
        for epoch in range(start_epoch, config.epochs):
            t_epoch = time.time()
            record: dict[str, Any] = {"epoch": epoch}
            for pass_name, fn, counter_of, pass_id in (
                    ("theta1", passes.theta1, lambda s: int(s.step), 0),
                    ("theta2", passes.theta2, lambda s: int(s.meta_step), 1)):
                if pass_name == "theta2" and not maxl_method:
                    continue
                order = _epoch_order(n_train, steps_per_epoch, config.batch_size, config.seed,
                                     epoch, pass_id)
                first = counter_of(state) - epoch * steps_per_epoch
                bar = _progress(steps_per_epoch, f"epoch {epoch} {pass_name}", progress)
                if bar is not None:
                    bar.update(first)
                history, pending = [], None
                t_pass = time.time()
                for i in range(first, steps_per_epoch):
                    step_number = epoch * steps_per_epoch + i
                    state, m = fn(state, train_data, order[i])
                    if pending is not None and not bool(pending[1]["finite"]):
                        _raise_non_finite(pending[1], _CHECKED[pass_name], pass_name, pending[0],
                                          epoch)
                    pending = (step_number, m)
                    history.append(m)
                    if bar is not None:
                        bar.update(1)
                    if step_interval and (step_number + 1) % step_interval == 0:
                        save(state)
                    if stop["signal"] is not None:
                        raise KeyboardInterrupt(f"signal {stop['signal']}")
                if pending is not None and not bool(pending[1]["finite"]):
                    _raise_non_finite(pending[1], _CHECKED[pass_name], pass_name, pending[0], epoch)
                if bar is not None:
                    bar.close()
                done = len(history)
                pass_time = time.time() - t_pass
                summary = _mean_metrics(history)
                if summary:
                    summary["images_per_sec"] = done * config.batch_size / max(pass_time, 1e-9)
                record[pass_name] = summary
            sums = jax.device_get([passes.evaluate(state, test_data, idx) for idx in eval_idx])
            correct = sum(float(s["correct"]) for s in sums)
            count = sum(float(s["count"]) for s in sums)
            record["test"] = {"accuracy": correct / count,
                              "loss": sum(float(s["loss_sum"]) for s in sums) / count}
            if maxl_method and record.get("theta2"):
                t2 = record["theta2"]
                record["label_usage"] = _to_json(maxl.block_usage(
                    jnp.asarray(t2["soft_label_sum"]), jnp.asarray(t2["primary_count"]),
                    jnp.asarray(t2["label_entropy_sum"]), psi))
            record["epoch_time"] = time.time() - t_epoch
            record = _to_json(record)
            records.append(record)
            _append_record(metrics_path, record)
            log(_epoch_line(record, config.epochs))
            save(state)
    except KeyboardInterrupt:
        save(state)
        ckpt.close()
        log(f"Interrupted: saved a checkpoint at theta1 step {int(state.step)}, theta2 step "
            f"{int(state.meta_step)} in {ckpt.directory}; run the same command to resume.")
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    ckpt.close()

    summary = summarize(records, config, time.time() - t_start, steps_per_epoch)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_learning_curves(records, workdir / "learning_curves.png",
                         title=f"{config.method} on {config.dataset} ({config.arch})")
    summary["state"] = state
    return summary


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _read_records(path: pathlib.Path, keep_before: int) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec["epoch"] < keep_before:
                records.append(rec)
    return records


def _write_records(path: pathlib.Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _append_record(path: pathlib.Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _epoch_line(r: dict, epochs: int) -> str:
    t1 = r.get("theta1", {})
    line = (f"epoch {r['epoch'] + 1:4d}/{epochs} | train primary loss {t1.get('primary_loss', 0):.4f}"
            f" acc {t1.get('accuracy', 0):.4f}")
    if "theta2" in r:
        t2 = r["theta2"]
        line += (f" | meta primary {t2['primary_before']:.4f} -> {t2['primary_after']:.4f}"
                 f" label entropy {t2['label_entropy']:.3f}")
    line += (f" | test loss {r['test']['loss']:.4f} acc {r['test']['accuracy']:.4f}"
             f" | {r['epoch_time']:.1f}s")
    return line


def summarize(records: list[dict], config, wall_time: float, steps_per_epoch: int) -> dict:
    """Final, best and mean-of-last-k test accuracy, wall time and throughput."""
    acc = [r["test"]["accuracy"] for r in records]
    k = min(int(config.last_k), len(acc)) if acc else 0
    # Throughput of the theta1 pass, leaving out epoch 1 (compilation) when there are others; a
    # resumed epoch whose pass was already done has no figure.
    ips = [r.get("theta1", {}).get("images_per_sec") for r in records]
    ips = [x for x in (ips[1:] if len(ips) > 1 else ips) if x is not None]
    return {
        "method": config.method, "dataset": config.dataset, "arch": config.arch,
        "seed": config.seed, "epochs": len(records), "steps_per_epoch": steps_per_epoch,
        "final_test_accuracy": acc[-1] if acc else None,
        "best_test_accuracy": max(acc) if acc else None,
        "best_epoch": int(np.argmax(acc)) + 1 if acc else None,
        "last_k": k, "last_k_mean_test_accuracy": float(np.mean(acc[-k:])) if k else None,
        "test_accuracy": acc,
        "wall_time_s": wall_time,
        "train_images_per_sec": float(np.median(ips)) if ips else None,
        "config": json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config),
    }


def plot_learning_curves(records: list[dict], path: pathlib.Path, title: str = "") -> None:
    """Train/test loss and accuracy per epoch (and the meta step's quantities for MAXL) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    nan = float("nan")

    def get(r, part, key):
        return r.get(part, {}).get(key, nan)

    epochs = [r["epoch"] + 1 for r in records]
    has_meta = any("theta2" in r for r in records)
    fig, axes = plt.subplots(1, 3 if has_meta else 2, figsize=(15 if has_meta else 10, 4))
    ax = axes[0]
    ax.plot(epochs, [get(r, "theta1", "primary_loss") for r in records], label="train primary")
    ax.plot(epochs, [r["test"]["loss"] for r in records], label="test primary")
    ax.set(xlabel="epoch", ylabel="focal loss", title="loss")
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [get(r, "theta1", "accuracy") for r in records], label="train")
    ax.plot(epochs, [r["test"]["accuracy"] for r in records], label="test")
    ax.set(xlabel="epoch", ylabel="primary accuracy", title="accuracy")
    ax.legend()
    if has_meta:
        ax = axes[2]
        meta_rec = [r for r in records if r.get("theta2")]
        me = [r["epoch"] + 1 for r in meta_rec]
        ax.plot(me, [r["theta2"]["primary_before"] for r in meta_rec], label="primary at theta1")
        ax.plot(me, [r["theta2"]["primary_after"] for r in meta_rec], label="primary at theta1+")
        ax.plot(me, [r["theta2"]["label_entropy"] for r in meta_rec], label="label entropy (nats)")
        ax.set(xlabel="epoch", title="meta step")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""A run's records in its workdir: ``metrics.jsonl`` (one JSON line per epoch, its ``epoch`` the
0-based index), the epoch clock beside the checkpoints (``epoch_clock.json``), ``summary.json``
(``summarize``; its ``best_epoch`` and ``missing_epochs`` count from 1, as the console does), and the
console's epoch line. Pure functions of files and records: the loop (``maxl_jax.train``) decides when
to call them.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from maxl_jax import methods, validation
from maxl_jax.methods.base import Method


def to_json(x):
    if isinstance(x, dict):
        return {k: to_json(v) for k, v in x.items()}
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    arr = np.asarray(x)
    return arr.item() if arr.ndim == 0 else arr.tolist()


def read_records(path: pathlib.Path, keep_before: int) -> list[dict]:
    """The records of epochs before ``keep_before``. A torn last line (a write cut by a kill) is
    dropped; a damaged line elsewhere, or records out of epoch order (swapped or repeated lines), is
    an error naming the line."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records, records_seen = [], []  # kept records; (line number, epoch) of every record read
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the last record's write was cut off: that epoch is redone or rebuilt
            raise validation.ConfigError(
                f"{path} line {number} is not a JSON record: the file was damaged. Restore it, or "
                f"delete the damaged line to have the run redo or rebuild what it can.") from None
        epoch = rec.get("epoch") if isinstance(rec, dict) else None
        if not isinstance(epoch, int) or (records_seen and epoch <= records_seen[-1][1]):
            what = ("has no epoch number" if not isinstance(epoch, int) else
                    f"repeats epoch {epoch + 1}" if epoch == records_seen[-1][1] else
                    f"holds epoch {epoch + 1} after line {records_seen[-1][0]}'s epoch "
                    f"{records_seen[-1][1] + 1}")
            raise validation.ConfigError(
                f"{path} line {number} {what}: the records are out of order, so the file was "
                f"edited or damaged. Restore it, or put its lines in epoch order with one line per "
                f"epoch (deleting a line has the run rebuild or redo what it can).")
        records_seen.append((number, epoch))
        if epoch < keep_before:
            records.append(rec)
    return records


#: The file beside the checkpoints that carries the current epoch's clock over a resume.
CLOCK = "epoch_clock.json"


def read_clock(workdir: pathlib.Path, step: int, epoch: int) -> tuple[float, int] | None:
    """``(elapsed seconds, training steps)`` of epoch ``epoch`` before the checkpoint of ``step``,
    from ``CLOCK`` when it was written for that checkpoint; else ``None``."""
    try:
        c = json.loads((workdir / CLOCK).read_text())
        if int(c["step"]) == step and int(c["epoch"]) == epoch:
            return float(c["elapsed_s"]), int(c["trained"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_records(path: pathlib.Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if not path.exists() or path.read_text() != text:  # a finished run's file is left as it is
        write_atomic(path, text)


def append_record(path: pathlib.Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def epoch_line(r: dict, epochs: int, method: Method) -> str:
    t = r.get("train", {})
    line = (f"epoch {r['epoch'] + 1:4d}/{epochs} | train primary loss {t['primary_loss']:.4f}"
            f" acc {t['accuracy']:.4f}")
    for key, label in method.train_report:
        if key in t:
            values = np.atleast_1d(np.asarray(t[key], dtype=float))
            line += f" | {label} " + " ".join(f"{v:.2f}" for v in values)
    meta = r.get("meta")
    if meta:
        line += " | " + " ".join(f"{label} {meta[key]:.4f}" for key, label in method.report
                                 if key in meta)
    if "test" in r:
        line += f" | test loss {r['test']['loss']:.4f} acc {r['test']['accuracy']:.4f}"
    return line + f" | {r['epoch_time']:.1f}s"


def evaluates(epoch: int, config) -> bool:
    """Whether the run evaluates after (0-based) ``epoch``: every ``eval_every``-th epoch, and each
    of the last ``last_k`` epochs, whose mean is reported."""
    every = int(config.get("eval_every") or 1)  # last_k >= 1: the last epoch is always evaluated
    return (epoch + 1) % every == 0 or epoch >= int(config.epochs) - int(config.last_k)


def summarize(records: list[dict], config, steps_per_epoch: int, method=None) -> dict:
    """Final, best (with its epoch number) and mean-of-last-k test accuracy, time and throughput.

    ``test_accuracy`` has one entry per epoch, ``None`` for the epochs not evaluated
    (``eval_every``); best and mean-of-last-k are taken over the evaluated ones. ``last_k`` is the
    config's; ``last_k_evaluated`` how many evaluated epochs the mean covers (fewer only when the
    run has fewer). With the built ``method``: ``psi``, the hierarchy its generated or random labels
    used (``config.psi`` is empty when it comes from ``aux_per_class``; ``None`` for a method with
    neither), and ``aux_tasks``, its given auxiliary tasks with their hierarchies.
    """
    evaluated = [r for r in records if "test" in r]
    acc = [r["test"]["accuracy"] for r in evaluated]
    k = min(int(config.last_k), len(acc)) if acc else 0
    ips = [r.get("train_images_per_sec") for r in records]
    ips = [x for x in ips if x is not None]
    best = int(np.argmax(acc)) if acc else None
    done = [r["epoch"] for r in records]
    missing = sorted(set(range(max(done) + 1)) - set(done)) if done else []
    return {
        "method": config.method, "dataset": config.dataset, "arch": config.arch,
        "seed": config.seed, "epochs": len(records), "steps_per_epoch": steps_per_epoch,
        "final_test_accuracy": (records[-1]["test"]["accuracy"]
                                if records and "test" in records[-1] else None),
        "best_test_accuracy": acc[best] if acc else None,
        "best_epoch": evaluated[best]["epoch"] + 1 if acc else None,
        "last_k": int(config.last_k), "last_k_evaluated": k, "last_k_mean_test_accuracy": float(np.mean(acc[-k:])) if k else None,
        "test_accuracy": [r["test"]["accuracy"] if "test" in r else None for r in records],
        "complete": not missing, "missing_epochs": [m + 1 for m in missing],
        "train_time_s": float(sum(r.get("epoch_time") or 0.0 for r in records)),
        "train_time_complete": not any(r.get("epoch_time_partial") or r.get("epoch_time") is None
                                       for r in records),
        "train_images_per_sec": float(np.median(ips)) if ips else None,
        "mode": _mode(config),
        **({} if method is None else {
            "psi": _psi_used(method),
            "aux_tasks": [[t.source, [int(p) for p in t.psi]] for t in method.aux_tasks]}),
        "config": json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config),
    }


def _psi_used(method) -> list[int] | None:
    """The hierarchy of the method's generated labels, else of its random auxiliary labels (the
    ``psi`` that ``--config.psi`` or ``aux_per_class`` chose); ``None`` for neither."""
    psi = getattr(method, "psi", None)
    if psi is None:
        psi = next((t.psi for t in method.aux_tasks if t.source == "random"), None)
    return None if psi is None else [int(p) for p in psi]


def _mode(config) -> dict | None:
    """The method's ``mode_of(config)``: which of the paper's, the authors' or our behaviours the
    run followed (``None`` for a config without a known method)."""
    try:
        return methods.get(config.method).mode_of(config)
    except (ValueError, AttributeError, KeyError):
        return None

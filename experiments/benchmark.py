"""The method benchmark: every ``--method`` on real data, at a measured convergence budget, seeds paired.

    python -m experiments.benchmark run --protocol=emnist_letters_low --jobs=2     # the grid
    python -m experiments.benchmark report                                       # tables, plots
    python -m experiments.benchmark budget --protocol=fmnist10_low --epochs=150  # the budget curves
    python -m experiments.benchmark list --protocol=fmnist10_low                 # cells and state

``run`` trains every variant x seed of a protocol, each in its own process, ``--jobs`` at a time,
with the machine's cores divided between them (each process pinned to its own cores, XLA told to use
that many threads). A run trains in ``<workdir>/<protocol>/<variant>/seed<n>`` (checkpoints, its
log.txt) and, once complete, leaves its records in ``<results>/<protocol>/<variant>/seed<n>``
(``summary.json``, ``metrics.jsonl``, and for MAXL's seed 0 ``labels.npz``, what its generator
assigns to each test image): small files, committed. A run with records there is skipped, an
interrupted one resumes from its checkpoint (Ctrl-C stops the grid; the same command goes on).
``report`` rebuilds every table and plot from the records alone (the label grids also read the
test images from the data folder).

``budget`` trains single-task and MAXL for ``--epochs`` with ``--config.eval_split=validation``
(images of the unused training set, never the test set) and prints, for each candidate budget E, the
mean validation accuracy over the last 10% of E's epochs against the curve's best: the protocol's
epochs (:data:`PROTOCOLS`) are the smallest E within 0.3 points for both.

Every run uses its method's documented defaults (``experiments/configs/default.py``, the method
modules), the small CNN of ``experiments/configs/cpu.py`` and the protocol's data; nothing is tuned.
Each seed draws its own training subset, initialisation and shuffles, shared by every variant of the
seed, so differences from single-task are paired by seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np

__all__ = ["PROTOCOLS", "Protocol", "Variant", "cell_config", "cells", "run_state", "run_grid",
           "paired_difference", "T975", "budget_table", "collect", "leaderboard"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of a leaderboard: a method, its hierarchy and the auxiliary tasks it is given."""

    method: str
    psi: tuple[int, ...] = ()       # empty: the data set's (human) or aux_per_class
    aux_tasks: str = ""             # for methods that learn from given labels
    overrides: tuple = ()           # ((field, value), ...) beyond the method's defaults
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Protocol:
    dataset: str
    data_subdir: str                # folder under the shared data dir
    train_fraction: float
    epochs: int                     # measured by `budget` (docs/results/benchmark/runs/budget)
    variants: dict
    budget_variants: tuple = ("single", "maxl_psi5")
    seeds: tuple = (0, 1, 2)
    more_seeds: tuple = ()          # variants run with seeds 0..4
    accelerator: bool = False       # VGG-16 from experiments/configs/default.py, for a GPU or TPU
    primary_level: int = 0          # cifar100: 20, 10 or 3
    published: str = ""             # figures to compare with, for the write-up


# Methods that learn from auxiliary labels the data supply (AuxTask "human" or "random").
GIVEN_LABEL_METHODS = ("equal", "gcs", "olaux", "auxilearn", "maoal")


def _every(method: str, every: int) -> tuple:
    """AuxiLearn's meta step comes every 30 training steps (their Pet experiment). Our schedules
    count within an epoch, and a 5% epoch holds 28 (Fashion-MNIST) or 59 (EMNIST) steps after the
    held-out split: 30 would give none, or one per 59. ``every`` keeps their rate, aligned to the
    epoch: 28 (one an epoch) and 29 (two an epoch). 0: the default."""
    return ((f"{method}.every", every),) if every else ()


_EVERY_NOTE = "AuxiLearn's one meta step per 30 training steps, aligned to the epoch"


def _given(aux_tasks: str, psi=(), every: int = 0) -> dict:
    note = _EVERY_NOTE if every else ""
    return {"equal": Variant("equal", psi, aux_tasks),
            "gcs": Variant("gcs", psi, aux_tasks),
            "olaux": Variant("olaux", psi, aux_tasks),
            "olaux_authors": Variant("olaux", psi, aux_tasks, (("olaux.authors", True),),
                                     "the authors' settings (olaux/ddpg.py): summed products, "
                                     "4-step gradient smoothing, log-losses, total main gradient, "
                                     "beta 5"),
            "auxilearn_linear": Variant("auxilearn", psi, aux_tasks,
                                        (("auxilearn.combiner", "linear"),
                                         *_every("auxilearn", every)), note),
            "auxilearn_nonlinear": Variant("auxilearn", psi, aux_tasks,
                                           (("auxilearn.combiner", "nonlinear"),
                                            *_every("auxilearn", every)), note),
            "maoal": Variant("maoal", psi, aux_tasks)}


def _generators(psi, suffix: str, every: int = 0) -> dict:
    return {"tailoring": Variant("tailoring"), "meta_tailoring": Variant("meta_tailoring"),
            f"wamal{suffix}": Variant("wamal", psi),
            f"auxilearn_generate{suffix}": Variant("auxilearn_generate", psi,
                                                   overrides=_every("auxilearn_generate", every),
                                                   note=_EVERY_NOTE if every else ""),
            f"maoal_generate{suffix}": Variant("maoal_generate", psi),
            f"dtg{suffix}": Variant("dtg", psi),
            f"rlaux{suffix}": Variant("rlaux", psi)}


#: Where finished runs leave their records (committed; ``--results``).
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results" / "benchmark" / "runs"

_P2, _P5 = (2,) * 26, (5,) * 26
PROTOCOLS: dict[str, Protocol] = {
    # EMNIST-letters, 240 images per letter: does a generator find the hidden case sub-classes?
    "emnist_letters_low": Protocol(
        dataset="emnist_letters", data_subdir="emnist_letters", train_fraction=0.05, epochs=150,
        variants={"single": Variant("single"),
                  "random_psi2": Variant("random", _P2), "random_psi5": Variant("random", _P5),
                  "maxl_psi2": Variant("maxl", _P2), "maxl_psi5": Variant("maxl", _P5),
                  "maxl_fd_psi5": Variant("maxl", _P5, overrides=(("meta_form", "finite_difference"),),
                                          note="finite-difference first order"),
                  **_generators(_P5, "_psi5", every=29), **_given("random", _P5, every=29)}),
    # Fashion-MNIST, 10 classes, 300 images per class.
    "fmnist10_low": Protocol(
        dataset="fashion_mnist", data_subdir="fashion_mnist", train_fraction=0.05, epochs=130,
        variants={"single": Variant("single"), "random_psi5": Variant("random", (5,) * 10),
                  "maxl_psi5": Variant("maxl", (5,) * 10),
                  **_generators((5,) * 10, "_psi5", every=28),
                  **_given("random", (5,) * 10, every=28)}),
    # Fashion-MNIST, 5 coarse groups; the 10 classes are the human auxiliary task.
    "fmnist_coarse_low": Protocol(
        dataset="fashion_mnist_coarse", data_subdir="fashion_mnist", train_fraction=0.05, epochs=70,
        variants={"single": Variant("single"), "random": Variant("random", (4, 1, 1, 3, 1)),
                  "human": Variant("human"), "maxl_psi_human": Variant("maxl", (4, 1, 1, 3, 1)),
                  **_generators((4, 1, 1, 3, 1), "_psi_human", every=28),
                  **_given("human,random", (4, 1, 1, 3, 1), every=28)},
        budget_variants=("single", "maxl_psi_human"),
        # single, MAXL and the two highest of the 3-seed leaderboard (rlaux 95.63, auxilearn_generate
        # 95.32, committed 2026-12-07) get seeds 3 and 4 too.
        more_seeds=("single", "maxl_psi_human", "rlaux_psi_human", "auxilearn_generate_psi_human")),
    # Accelerator protocols: defined and one command each, not run on the CPU (see docs/RESULTS.md).
    # The MAXL reference: CIFAR-100, 20 superclasses, VGG-16-BN, 200 epochs, crop + flip.
    "cifar100_20_vgg16": Protocol(
        dataset="cifar100", data_subdir="", train_fraction=1.0, epochs=200, accelerator=True,
        primary_level=20,
        variants={"single": Variant("single"), "random": Variant("random", (5,) * 20),
                  "human": Variant("human"), "maxl_psi5": Variant("maxl", (5,) * 20),
                  **_generators((5,) * 20, "_psi5"), **_given("human")},
        published="single 71.86, human 75.52, random 75.70, MAXL 75.98, WAMAL 81.31 (one run "
                  "each; MAXL paper and WAMAL's notebook)"),
    # AuxiLearn's low-data protocol: CIFAR-10, 5% of the training set (250 images per class).
    "cifar10_low_vgg16": Protocol(
        dataset="cifar10", data_subdir="", train_fraction=0.05, epochs=200, accelerator=True,
        variants={"single": Variant("single"), "random_psi5": Variant("random", (5,) * 10),
                  "maxl_psi5": Variant("maxl", (5,) * 10), **_generators((5,) * 10, "_psi5"),
                  **{k: dataclasses.replace(v, psi=(5,) * 10) for k, v in _given("random").items()}},
        published="single 50.8, MAXL 58.2, AuxiLearn 60.7 (AuxiLearn paper, 3 runs)"),
}
CPU_PROTOCOLS = tuple(k for k, v in PROTOCOLS.items() if not v.accelerator)


def shared_data_root() -> pathlib.Path:
    """``maxl_jax.data.shared_data_dir``'s folder, whether it exists or not, without importing JAX
    (the grid's parent process stays free of its threads: it forks the runs)."""
    return pathlib.Path(os.environ.get("MAXL_SHARED_DATA") or
                        pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")


#: The grid evaluates after every EVAL_EVERY-th epoch and each of the last 10% (the headline's).
EVAL_EVERY = 5


def cell_config(protocol: str, variant: str, seed: int, *, data_dir: str | None = None,
                epochs: int = 0, width: int = 16, eval_split: str = "test",
                eval_every: int = EVAL_EVERY):
    """The config of one run: ``experiments/configs/cpu.py`` with the protocol's data and method."""
    from experiments.configs import cpu, default

    spec = PROTOCOLS[protocol]
    v = spec.variants[variant]
    c = default.get_config() if spec.accelerator else cpu.get_config()
    c.dataset, c.train_fraction = spec.dataset, spec.train_fraction
    if spec.primary_level:
        c.primary_level = spec.primary_level
    if spec.accelerator:   # TFDS's folder, or the official archive fetched there
        c.data_dir, c.download = data_dir or "", True
    else:
        c.data_dir, c.download = data_dir or str(shared_data_root() / spec.data_subdir), False
    c.method, c.seed, c.psi, c.aux_tasks = v.method, int(seed), tuple(v.psi), v.aux_tasks
    if not spec.accelerator:
        c.width = width
    c.update_from_flattened_dict(dict(v.overrides))
    c.epochs = epochs or spec.epochs
    c.last_k = max(1, c.epochs // 10)      # the headline: mean test accuracy of the last 10% epochs
    c.eval_batch_size = 1040               # divides EMNIST's 20,800 and rounds FMNIST's 10,000 up
    c.eval_split = eval_split
    c.eval_every = eval_every
    # 16 steps per compiled call: the same numbers as 1 (benchmarks.loop: bit-identical), a third
    # less host work per step for the small CNN on the CPU. Accelerators: their default (20).
    c.steps_per_call = 0 if spec.accelerator else 16
    return c


def cells(protocol: str, only=(), seeds=None) -> list[tuple[str, int]]:
    """The protocol's (variant, seed) pairs: its seeds, and 0..4 for its ``more_seeds`` variants."""
    spec = PROTOCOLS[protocol]
    out = []
    for variant in spec.variants:
        if only and variant not in only:
            continue
        s = seeds if seeds is not None else (tuple(range(5)) if variant in spec.more_seeds
                                             else spec.seeds)
        out += [(variant, int(x)) for x in s]
    return out


def run_state(run_dir: pathlib.Path) -> str:
    """``"done"`` (a complete summary.json), ``"partial"`` (a checkpoint or records to resume from)
    or ``"new"``."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("complete"):
                return "done"
        except (OSError, json.JSONDecodeError):
            pass
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "partial"
    return "new"


def _short(path: pathlib.Path) -> str:
    """``protocol/variant/seedN``: a run folder's last three parts."""
    return "/".join(pathlib.Path(path).parts[-3:])


def _fmt_s(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


#: Exit codes of a run stopped by a signal it handled (SIGINT 130, SIGTERM 143) or died of.
_INTERRUPTED = (130, 143, -signal.SIGINT, -signal.SIGTERM)


def _stop_grid(signum, frame):
    raise KeyboardInterrupt


def run_grid(jobs: list[tuple], n_jobs: int, cores: int | None = None,
             log=print, poll_s: float = 1.0) -> dict:
    """Runs ``(argv, result_dir[, work_dir])`` jobs as subprocesses, ``n_jobs`` at a time, dividing
    ``cores``.

    Jobs whose ``result_dir`` is done (:func:`run_state`) are skipped; the rest run (resuming what
    they find). Each process is pinned to its share of the cores and its XLA told to use that many
    threads; its output goes to ``work_dir/log.txt`` (``work_dir`` defaults to ``result_dir``).
    Returns ``{"done": [...], "failed": [(result_dir, rc)], "skipped": [...]}`` of result dirs.
    On Ctrl-C / SIGTERM the running processes get SIGTERM (they save and stop) and it raises
    ``KeyboardInterrupt``; so it does when a run stops on a signal of its own (exit 130 or 143, a
    user interrupting it): the grid stops there rather than start the next run. SIGINT is honoured
    even when the grid was started in the background of a script (which would ignore it).
    """
    jobs = [(j[0], j[1], j[2] if len(j) > 2 else j[1]) for j in jobs]
    cores = cores or len(os.sched_getaffinity(0))
    n_jobs = max(1, min(n_jobs, cores))
    share = cores // n_jobs
    all_cores = sorted(os.sched_getaffinity(0))[:cores]
    slots = [all_cores[i * share:(i + 1) * share] for i in range(n_jobs)]
    todo = [j for j in jobs if run_state(j[1]) != "done"]
    result = {"done": [], "failed": [], "skipped": [d for _, d, _ in jobs if run_state(d) == "done"]}
    log(f"{len(jobs)} runs: {len(result['skipped'])} finished already, {len(todo)} to run, "
        f"{n_jobs} at a time on {share} core{'s' * (share > 1)} each")
    running: dict[int, tuple] = {}   # slot -> (proc, run_dir, start, logfile)
    durations = []
    t0 = time.time()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, _stop_grid)
    try:
        while todo or running:
            free = [i for i in range(n_jobs) if i not in running]
            while todo and free:
                slot = free.pop(0)
                argv, run_dir, work_dir = todo.pop(0)
                work_dir.mkdir(parents=True, exist_ok=True)
                env = dict(os.environ, PYTHONUNBUFFERED="1",
                           XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                                      f"{'true' if share > 1 else 'false'} "
                                      f"intra_op_parallelism_threads={share}").strip())
                logfile = open(work_dir / "log.txt", "a")
                mine = slots[slot]
                # Pinned from here, not in a preexec_fn (unsafe in a process with threads).
                proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, env=env)
                try:
                    os.sched_setaffinity(proc.pid, mine)
                except OSError:  # it has ended already
                    pass
                running[slot] = (proc, run_dir, time.time(), logfile)
                log(f"  start {_short(run_dir)} (cores {mine})")
            time.sleep(poll_s)
            for slot, (proc, run_dir, start, logfile) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                logfile.close()
                del running[slot]
                took = time.time() - start
                if rc == 0 and run_state(run_dir) == "done":
                    durations.append(took)
                    result["done"].append(run_dir)
                    acc = json.loads((run_dir / "summary.json").read_text())
                    left = len(todo) + len(running)
                    eta = np.mean(durations) * left / n_jobs
                    log(f"  done  {_short(run_dir)} in {_fmt_s(took)}: final test accuracy "
                        f"{100 * acc['final_test_accuracy']:.2f}, mean of last {acc['last_k']} "
                        f"{100 * acc['last_k_mean_test_accuracy']:.2f} "
                        f"[{len(result['done'])} done, {left} left, about {_fmt_s(eta)} to go]")
                elif rc in _INTERRUPTED:
                    log(f"  {_short(run_dir)} was interrupted (exit {rc}; it resumes on the next "
                        f"run): stopping the grid")
                    raise KeyboardInterrupt
                else:
                    result["failed"].append((run_dir, rc))
                    log(f"  FAILED {_short(run_dir)} (exit {rc}); its log: {logfile.name}")
    except BaseException:
        for proc, run_dir, _, logfile in running.values():
            proc.send_signal(signal.SIGTERM)
        for proc, run_dir, _, logfile in running.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            logfile.close()
            log(f"  stopped {_short(run_dir)} (it resumes on the next run)")
        raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    log(f"grid finished in {_fmt_s(time.time() - t0)}: {len(result['done'])} ran, "
        f"{len(result['failed'])} failed, {len(result['skipped'])} were finished already")
    return result


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------

#: Two-sided 95% quantiles of Student's t, t_{0.975, df}, df = 1..30.
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010,
        2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739,
        2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def paired_difference(a: dict, b: dict) -> dict | None:
    """Mean of ``a[seed] - b[seed]`` over the seeds both have, with its 95% t interval.

    Returns ``{"n", "mean", "std", "low", "high", "excludes_zero"}`` (``std``: sample standard
    deviation of the differences; the interval ``mean +- t_{0.975, n-1} std / sqrt(n)``), or
    ``None`` with fewer than two paired seeds.
    """
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = np.array([a[s] - b[s] for s in seeds], float)
    n, mean, std = len(d), float(d.mean()), float(d.std(ddof=1))
    half = T975[min(n - 1, len(T975)) - 1] * std / np.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half,
            "excludes_zero": bool(mean - half > 0 or mean + half < 0)}


def budget_table(curves: dict, candidates, tolerance: float = 0.3) -> tuple[str, int | None]:
    """For each candidate budget E: each curve's mean over its last 10% of E epochs, and its gap to
    the curve's best (all epochs measured). Returns the markdown table and the smallest E at which
    every gap is within ``tolerance`` points (``None`` if none is).

    ``curves``: ``{name: accuracies in percent, one per epoch}``.
    """
    names = list(curves)
    lines = ["| epochs E | " + " | ".join(f"{n}: mean of last 10% (gap to best {max(curves[n]):.2f})"
                                          for n in names) + " | all within |",
             "| --- |" + " --- |" * (len(names) + 1)]
    chosen = None
    for e in candidates:
        row, ok = [], True
        for n in names:
            c = np.asarray(curves[n], float)
            if e > len(c):
                row.append("")
                ok = False
                continue
            k = max(1, e // 10)
            m = float(c[e - k:e].mean())
            gap = float(c.max()) - m
            ok &= gap <= tolerance
            row.append(f"{m:.2f} ({gap:.2f})")
        if ok and chosen is None:
            chosen = e
        lines.append(f"| {e} | " + " | ".join(row) + f" | {'yes' if ok else 'no'} |")
    return "\n".join(lines) + "\n", chosen


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------


def collect(protocol: str, workdir: pathlib.Path) -> dict:
    """``{variant: {seed: summary}}`` of the finished runs of a protocol, from their files alone."""
    out = {}
    for variant, seed in cells(protocol, seeds=range(10)):
        path = workdir / protocol / variant / f"seed{seed}" / "summary.json"
        if path.is_file():
            s = json.loads(path.read_text())
            if s.get("complete"):
                out.setdefault(variant, {})[seed] = s
    return out


def _headline(s: dict) -> float:
    return 100 * s["last_k_mean_test_accuracy"]


def leaderboard(protocol: str, results: dict) -> tuple[str, list[dict]]:
    """The markdown leaderboard of a protocol and its rows (sorted by the headline, best first)."""
    single = {seed: _headline(s) for seed, s in results.get("single", {}).items()}
    single_time = {seed: s["train_time_s"] for seed, s in results.get("single", {}).items()}
    rows = []
    for variant, runs in results.items():
        head = np.array([_headline(s) for s in runs.values()])
        final = np.array([100 * s["final_test_accuracy"] for s in runs.values()])
        diff = paired_difference({k: _headline(s) for k, s in runs.items()}, single) \
            if variant != "single" else None
        rel = [s["train_time_s"] / single_time[k] for k, s in runs.items() if k in single_time]
        any_run = next(iter(runs.values()))
        rows.append({"variant": variant, "method": any_run["method"], "seeds": sorted(runs),
                     "headline_mean": float(head.mean()),
                     "headline_std": float(head.std(ddof=1)) if len(head) > 1 else 0.0,
                     "final_mean": float(final.mean()),
                     "final_std": float(final.std(ddof=1)) if len(final) > 1 else 0.0,
                     "diff": diff, "time_rel": float(np.mean(rel)) if rel else None,
                     "train_time_s": float(np.mean([s["train_time_s"] for s in runs.values()])),
                     "epochs": any_run["epochs"], "last_k": any_run["last_k"],
                     "steps_per_epoch": any_run["steps_per_epoch"],
                     "curves": [[np.nan if a is None else a for a in s["test_accuracy"]]
                                for s in runs.values()]})
    rows.sort(key=lambda r: -r["headline_mean"])
    if not rows:
        return f"### {protocol}: no finished runs yet\n", rows
    r0 = rows[0]
    lines = [f"| # | variant | seeds | test acc., mean of last {r0['last_k']} epochs | final epoch "
             f"| minus single, paired (95% CI) | CI excludes 0 | training time / single (grid wall time: noisy, see the cost table) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(rows, 1):
        d = r["diff"]
        dtxt = (f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d else "")
        ex = ("yes, " + ("better" if d["mean"] > 0 else "worse")) if d and d["excludes_zero"] else \
            ("no" if d else "")
        rel = "" if r["time_rel"] is None else f"{r['time_rel']:.1f}x"
        lines.append(f"| {i} | {r['variant']} | {len(r['seeds'])} | {r['headline_mean']:.2f} +- "
                     f"{r['headline_std']:.2f} | {r['final_mean']:.2f} +- {r['final_std']:.2f} | "
                     f"{dtxt} | {ex} | {rel} |")
    return "\n".join(lines) + "\n", rows


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def plot_report(protocol: str, rows: list[dict], out: pathlib.Path) -> dict:
    """Three PNGs in ``out``: paired differences with 95% intervals, cost against gain, learning
    curves. Returns {path: matplotlib Figure}, in that order (a notebook displays the Figures)."""
    paths = {}
    diffs = [r for r in rows if r["diff"]]
    if diffs:
        fig = _figure((7, 0.35 * len(diffs) + 1.5))
        ax = fig.add_subplot()
        y = np.arange(len(diffs))[::-1]
        for yi, r in zip(y, diffs):
            d = r["diff"]
            color = "tab:green" if d["excludes_zero"] and d["mean"] > 0 else \
                "tab:red" if d["excludes_zero"] else "tab:gray"
            ax.errorbar(d["mean"], yi, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]],
                        fmt="o", color=color, capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y, [r["variant"] for r in diffs], fontsize=8)
        ax.set_xlabel("test accuracy minus single-task, paired by seed (points, 95% CI)")
        ax.set_title(f"{protocol}: gain over single-task")
        fig.tight_layout()
        paths[out / f"{protocol}_paired.png"] = fig
        fig.savefig(out / f"{protocol}_paired.png", dpi=110)
        fig = _figure((6.5, 4.5))
        ax = fig.add_subplot()
        for r in diffs:
            if r["time_rel"] is None:
                continue
            ax.scatter(r["time_rel"], r["diff"]["mean"], color="tab:blue")
            ax.annotate(r["variant"], (r["time_rel"], r["diff"]["mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training time relative to single-task (log)")
        ax.set_ylabel("gain over single-task (points)")
        ax.set_title(f"{protocol}: cost against gain")
        fig.tight_layout()
        paths[out / f"{protocol}_cost_gain.png"] = fig
        fig.savefig(out / f"{protocol}_cost_gain.png", dpi=110)
    if rows:
        fig = _figure((8, 5))
        ax = fig.add_subplot()
        lows = []
        for r in rows:
            acc = 100 * np.array(r["curves"], float).mean(0)
            x = np.arange(1, acc.size + 1)
            seen = ~np.isnan(acc)  # epochs the runs evaluated (every EVAL_EVERY-th, the last 10%)
            ax.plot(x[seen], acc[seen], label=r["variant"], lw=2 if r["variant"] == "single" else 1,
                    color="k" if r["variant"] == "single" else None)
            lows.append(acc[seen][len(acc[seen]) // 3])
        ax.set_ylim(min(lows) - 1, None)
        ax.set(xlabel="epoch", ylabel="test accuracy (%), mean over seeds",
               title=f"{protocol}: learning curves")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        paths[out / f"{protocol}_curves.png"] = fig
        fig.savefig(out / f"{protocol}_curves.png", dpi=110)
    return paths


def plot_label_grid(record: dict, images: np.ndarray, names, path: pathlib.Path | None, title: str,
                    per_class: int = 4):
    """One row per primary class; in it, for each of its auxiliary classes, the ``per_class`` test
    images the generator assigns to it most confidently (argmax), and the effective number of
    auxiliary classes the row uses. A class no image is assigned to is left blank. Saved at ``path``
    (None: not saved) and returned as a matplotlib Figure."""
    psi = np.asarray(record["psi"])
    starts = np.concatenate([[0], np.cumsum(psi)[:-1]])
    cols = int(psi.max()) * per_class
    fig = _figure((1.6 + 0.42 * cols, 0.5 + 0.46 * len(psi)))
    grid = fig.add_gridspec(len(psi), cols + 1, wspace=0.05, hspace=0.1,
                            width_ratios=[3.5] + [1] * cols)
    for c, (start, n) in enumerate(zip(starts, psi)):
        lab = fig.add_subplot(grid[c, 0])
        lab.axis("off")
        lab.text(0, 0.5, f"{names[c]}  eff {record['effective'][c]:.1f}/{n}", fontsize=7,
                 va="center")
        for j in range(n):
            idx = np.flatnonzero((record["argmax"] == start + j) & (record["primary"] == c))
            idx = idx[np.argsort(-record["confidence"][idx].astype(np.float32))][:per_class]
            for i in range(per_class):
                ax = fig.add_subplot(grid[c, 1 + j * per_class + i])
                ax.set_xticks([])
                ax.set_yticks([])
                for side in ax.spines.values():
                    side.set_visible(i == 0)
                if i < len(idx):
                    ax.imshow(images[idx[i]].squeeze(), cmap="gray_r")
    fig.suptitle(title, fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=80, bbox_inches="tight")
    return fig


def plot_labels(protocol: str, results: pathlib.Path, out: pathlib.Path, data_dir=None) -> dict:
    """The label grid of every variant whose seed 0 left a ``labels.npz`` (needs the test images:
    skipped, saying so, when the data folder is absent): {path: matplotlib Figure}."""
    from maxl_jax import data as data_lib

    spec = PROTOCOLS[protocol]
    records = [(v, results / protocol / v / "seed0" / "labels.npz") for v in spec.variants]
    records = [(v, f) for v, f in records if f.is_file()]
    if not records:
        return {}
    try:
        ds = data_lib.load_dataset(spec.dataset, data_dir=data_dir or str(shared_data_root() /
                                                                         spec.data_subdir))
    except (data_lib.DatasetNotFoundError, ValueError) as e:
        print(f"label grids of {protocol} skipped: no test images ({e})", file=sys.stderr)
        return {}
    paths = {}
    for variant, f in records:
        rec = dict(np.load(f))
        path = out / f"{protocol}_{variant}_labels.png"
        paths[path] = plot_label_grid(
            rec, ds.test.images, ds.primary_names, path,
            f"{protocol} / {variant} (seed 0): test images per generated class, most confident "
            f"first")
    return paths


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------


def embed(path: pathlib.Path, protocol: str, table: str) -> bool:
    """Replaces the text between ``<!-- benchmark:PROTOCOL -->`` and the next ``<!-- /benchmark -->``
    in ``path`` by ``table``; returns whether the file has such a block."""
    if not path.is_file():
        return False
    text = path.read_text()
    start = f"<!-- benchmark:{protocol} -->"
    i = text.find(start)
    j = text.find("<!-- /benchmark -->", i + 1) if i >= 0 else -1
    if i < 0 or j < 0:
        return False
    path.write_text(text[:i + len(start)] + "\n" + table + text[j:])
    return True


def _one(args) -> int:
    """Trains one cell in this process (the grid's worker)."""
    from absl import logging

    from maxl_jax import train

    logging.set_verbosity(logging.ERROR)
    config = cell_config(args.protocol, args.variant, args.seed, data_dir=args.data_dir or None,
                         epochs=args.epochs, width=args.width, eval_split=args.eval_split,
                         eval_every=args.eval_every)
    run_dir = pathlib.Path(args.run_dir)
    print(f"== {args.protocol} / {args.variant} / seed {args.seed}: {config.epochs} epochs, "
          f"eval on {config.eval_split}", flush=True)
    try:
        summary = train.train_and_evaluate(config, run_dir, progress=False)
    except train.Interrupted as e:
        print(e.message, flush=True)
        return 143 if e.signum == signal.SIGTERM else 130
    state = summary.pop("state")
    out = pathlib.Path(args.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.method == "maxl" and args.seed == 0 and args.eval_split == "test":
        np.savez_compressed(out / "labels.npz", **label_record(config, state))
    (out / "metrics.jsonl").write_text(compact_records((run_dir / "metrics.jsonl").read_text()))
    tmp = out / "summary.json.tmp"   # last, and atomically: a summary means the records are whole
    tmp.write_text((run_dir / "summary.json").read_text())
    tmp.replace(out / "summary.json")
    return 0


def _round(x, digits: int = 5):
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    return x


def compact_records(text: str) -> str:
    """A run's metrics.jsonl with every number at 5 significant digits (a third of the size; the
    summary keeps the full test accuracies)."""
    return "".join(json.dumps(_round(json.loads(line)), separators=(",", ":")) + "\n"
                   for line in text.splitlines() if line.strip())


def label_record(config, state) -> dict:
    """What a MAXL generator assigns to each test image, compactly: the argmax auxiliary class and
    its probability per image, and per primary class the effective number of auxiliary classes in
    use, how many win an argmax and the mean label entropy (``study.generated_label_summary``)."""
    from experiments import study

    d = study.generated_test_labels(config, state)
    eff, won, ent, counts, owner = study.generated_label_summary(d["soft"], d["primary"], d["psi"])
    return {"argmax": d["soft"].argmax(1).astype(np.int16),
            "confidence": d["soft"].max(1).astype(np.float16), "primary": d["primary"],
            "psi": d["psi"], "effective": eff, "won": won, "entropy": ent, "counts": counts}


def _jobs(protocol: str, workdir: pathlib.Path, results: pathlib.Path, args, seeds=None, only=(),
          eval_split="test", epochs=0, eval_every=EVAL_EVERY) -> list:
    out = []
    for variant, seed in cells(protocol, only=only, seeds=seeds):
        run_dir = workdir / protocol / variant / f"seed{seed}"
        result_dir = results / protocol / variant / f"seed{seed}"
        argv = [sys.executable, "-m", "experiments.benchmark", "one", f"--protocol={protocol}",
                f"--variant={variant}", f"--seed={seed}", f"--run-dir={run_dir}",
                f"--result-dir={result_dir}",
                f"--width={args.width}", f"--epochs={epochs}", f"--eval-split={eval_split}",
                f"--eval-every={eval_every}"]
        if args.data_dir:
            argv.append(f"--data-dir={args.data_dir}")
        out.append((argv, result_dir, run_dir))
    return out


def _check_data(protocol: str, data_dir: str | None) -> None:
    spec = PROTOCOLS[protocol]
    if spec.accelerator:
        return  # TFDS's folder or a download: the data layer says what is missing
    folder = pathlib.Path(data_dir or shared_data_root() / spec.data_subdir)
    if not folder.is_dir():
        sys.exit(f"Error: no data folder {folder} for {protocol} ({spec.dataset}). Pass "
                 f"--data-dir=FOLDER (its IDX archives), or set MAXL_SHARED_DATA to the folder "
                 f"holding {spec.data_subdir}/.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmark",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", default="runs/benchmark",
                        help="where the runs train (checkpoints, logs)")
    common.add_argument("--results", default=str(RESULTS),
                        help="where finished runs leave their records (committed)")
    common.add_argument("--data-dir", default="", help="the protocol's data folder (default: "
                        "$MAXL_SHARED_DATA/<emnist_letters|fashion_mnist>)")
    common.add_argument("--width", type=int, default=16, help="small CNN first-block filters")
    p_run = sub.add_parser("run", parents=[common], help="run a protocol's grid")
    p_run.add_argument("--protocol", choices=sorted(PROTOCOLS), required=True)
    p_run.add_argument("--jobs", type=int, default=2, help="runs at a time (cores divided)")
    p_run.add_argument("--only", default="", help="comma-separated variants (default: all)")
    p_run.add_argument("--seeds", default="", help="comma-separated seeds (default: the protocol's)")
    p_list = sub.add_parser("list", parents=[common], help="the protocol's cells and their state")
    p_list.add_argument("--protocol", choices=sorted(PROTOCOLS), required=True)
    p_bud = sub.add_parser("budget", parents=[common], help="measure the convergence budget")
    p_bud.add_argument("--protocol", choices=sorted(PROTOCOLS), required=True)
    p_bud.add_argument("--epochs", type=int, default=150)
    p_bud.add_argument("--jobs", type=int, default=2)
    p_bud.add_argument("--seeds", default="0")
    p_rep = sub.add_parser("report", parents=[common], help="tables and plots from the run files")
    p_rep.add_argument("--protocol", choices=sorted(PROTOCOLS), action="append")
    p_rep.add_argument("--out", default="docs/results/benchmark")
    p_rep.add_argument("--markdown", default=str(RESULTS.parents[2] / "RESULTS.md"),
                       help="a file whose <!-- benchmark:PROTOCOL --> ... <!-- /benchmark --> "
                            "blocks get each protocol's table ('' : none)")
    p_one = sub.add_parser("one", parents=[common], help=argparse.SUPPRESS)
    p_one.add_argument("--protocol", required=True)
    p_one.add_argument("--variant", required=True)
    p_one.add_argument("--seed", type=int, required=True)
    p_one.add_argument("--run-dir", required=True)
    p_one.add_argument("--result-dir", required=True)
    p_one.add_argument("--epochs", type=int, default=0)
    p_one.add_argument("--eval-split", default="test")
    p_one.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    args = parser.parse_args(argv)
    workdir = pathlib.Path(args.workdir).absolute()
    results = pathlib.Path(args.results).absolute()

    def ints(text, what):
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            parser.error(f"--{what}={text!r}: give comma-separated integers, e.g. 0,1,2")

    if args.command == "one":
        return _one(args)
    if args.command == "list":
        for variant, seed in cells(args.protocol):
            state = run_state(results / args.protocol / variant / f"seed{seed}")
            if state != "done":
                state = run_state(workdir / args.protocol / variant / f"seed{seed}")
                state = "partial" if state != "new" else state
            print(f"{state:8s} {variant} seed {seed}")
        return 0
    if args.command == "run":
        only = tuple(x.strip() for x in args.only.split(",") if x.strip())
        unknown = sorted(set(only) - set(PROTOCOLS[args.protocol].variants))
        if unknown:
            parser.error(f"--only: {unknown} are not variants of {args.protocol}; its variants: "
                         f"{', '.join(PROTOCOLS[args.protocol].variants)}")
        _check_data(args.protocol, args.data_dir)
        seeds = ints(args.seeds, "seeds") or None
        try:
            res = run_grid(_jobs(args.protocol, workdir, results, args, seeds, only), args.jobs)
        except KeyboardInterrupt:
            print("Stopped: the same command resumes the grid.", file=sys.stderr)
            return 130
        return 1 if res["failed"] else 0
    if args.command == "budget":
        _check_data(args.protocol, args.data_dir)
        spec = PROTOCOLS[args.protocol]
        bud = results / "budget"
        bud.mkdir(parents=True, exist_ok=True)
        seeds = ints(args.seeds, "seeds")
        jobs = _jobs(args.protocol, workdir / "budget", bud, args, seeds, spec.budget_variants,
                     "validation", args.epochs, eval_every=1)
        try:
            run_grid(jobs, args.jobs)
        except KeyboardInterrupt:
            print("Stopped: the same command resumes.", file=sys.stderr)
            return 130
        curves = {}
        for variant in spec.budget_variants:
            for seed in seeds:
                s = json.loads((bud / args.protocol / variant / f"seed{seed}" / "summary.json")
                               .read_text())
                curves[f"{variant} seed {seed}"] = 100 * np.array(s["test_accuracy"], float)
        md, chosen = budget_table(curves, range(10, args.epochs + 1, 10))
        text = (f"{args.protocol}: validation accuracy (%) of {', '.join(curves)} "
                f"({spec.dataset}, eval_split=validation, {args.epochs} epochs)\n\n{md}\n"
                f"smallest budget within 0.3 points of every curve's best: {chosen} epochs\n")
        print(text)
        (bud / f"{args.protocol}.md").write_text(text)
        return 0
    if args.command == "report":
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for protocol in args.protocol or [p for p in PROTOCOLS if (results / p).is_dir()]:
            found = collect(protocol, results)
            md, rows = leaderboard(protocol, found)
            (out / f"{protocol}.md").write_text(md)
            (out / f"{protocol}.json").write_text(json.dumps(
                {v: {str(k): {f: s[f] for f in ("final_test_accuracy", "last_k_mean_test_accuracy",
                                                 "test_accuracy", "train_time_s", "epochs",
                                                 "steps_per_epoch", "method", "seed")}
                     for k, s in runs.items()} for v, runs in found.items()}, indent=1))
            plot_report(protocol, rows, out)
            plot_labels(protocol, results, out, args.data_dir or None)
            print(f"## {protocol}\n\n{md}")
            if args.markdown:
                embed(pathlib.Path(args.markdown), protocol, md)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

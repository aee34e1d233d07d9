"""What the accelerator protocols of ``experiments.benchmark`` would cost: an estimate, not a run.

    python -m benchmarks.accelerator_estimate [--tflops 25,50,100]

From two committed measurements: the FLOPs of one VGG-16 training step at batch 100 (XLA's cost
analysis, the ``theta1`` JAX row of ``benchmarks/results/steps_final.md``), and each variant's epoch
cost relative to single-task (``epoch vs single`` of ``benchmarks/results/protocol_cost_fmnist10_low.md``,
measured on the small CNN: on VGG-16 the ratios differ, e.g. MAXL's second-order step is 2.7x a
training step's FLOPs there). A protocol's FLOPs are then ``sum over variants of ratio x epochs x
steps per epoch x FLOPs per step x seeds``, and its time that over an assumed achieved rate
(``--tflops``, in TFLOP/s: batch-100 32x32 steps reach a small fraction of an H100's 495 TFLOP/s
dense TF32 peak). Prints one markdown table; the figures are estimates, to be replaced by the runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re

from experiments import benchmark

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# Variants of the accelerator protocols named differently from the CPU cost table's rows.
ALIASES = {"random": "random_psi5", "human": "random_psi5"}


def _table_rows(path: pathlib.Path) -> list[list[str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def epoch_ratios(path: pathlib.Path) -> dict[str, float]:
    """``{variant: epoch cost / single-task's}`` from a ``benchmarks.protocol_cost`` table."""
    rows = _table_rows(path)
    col = rows[0].index("epoch vs single")
    return {r[0]: float(r[col].rstrip("x")) for r in rows[1:]}


def training_step_gflop(path: pathlib.Path) -> float:
    """GFLOP of one VGG-16 training (theta1) step at batch 100, from ``benchmarks.steps``'s table."""
    rows = _table_rows(path)
    head = rows[0]
    for r in rows[1:]:
        if r[head.index("model")] == "vgg16" and r[head.index("framework")] == "JAX" \
                and r[head.index("step")] == "theta1":
            return float(r[head.index("GFLOP/step")])
    raise ValueError(f"{path} has no VGG-16 JAX theta1 row")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflops", default="25,50,100",
                        help="assumed achieved TFLOP/s, comma-separated (default 25,50,100)")
    parser.add_argument("--cost", default=str(RESULTS / "protocol_cost_fmnist10_low.md"))
    parser.add_argument("--steps", default=str(RESULTS / "steps_final.md"))
    args = parser.parse_args(argv)
    rates = [float(x) for x in args.tflops.split(",")]
    ratios = epoch_ratios(pathlib.Path(args.cost))
    gflop = training_step_gflop(pathlib.Path(args.steps))
    train_sizes = {"cifar100": 50_000, "cifar10": 50_000}

    print(f"# Accelerator protocols: estimated cost\n\n`python -m benchmarks.accelerator_estimate "
          f"--tflops {args.tflops}`: VGG-16 training step {gflop:g} GFLOP at batch 100 "
          f"({pathlib.Path(args.steps).name}); epoch ratios from {pathlib.Path(args.cost).name} "
          f"(small CNN). Estimates, not runs.\n")
    print("| protocol | variants x seeds | steps / single-task epoch | single-task epochs, all "
          "variants | PFLOP | " + " | ".join(f"hours at {r:g} TFLOP/s" for r in rates) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in rates) + " |")
    for name, spec in benchmark.PROTOCOLS.items():
        if not spec.accelerator:
            continue
        missing = [v for v in spec.variants if ALIASES.get(v, v) not in ratios]
        if missing:  # variants added after the cost table was measured: left out, and said so
            print(f"<!-- {name}: not in the estimate (no measured epoch ratio in "
                  f"{pathlib.Path(args.cost).name}): {', '.join(missing)} -->")
            spec = dataclasses.replace(spec, variants={k: v for k, v in spec.variants.items()
                                                       if k not in missing})
        seeds = len(spec.seeds)
        steps = int(train_sizes[spec.dataset] * spec.train_fraction) // 100
        epochs_all = sum(ratios[ALIASES.get(v, v)] for v in spec.variants) * spec.epochs * seeds
        pflop = epochs_all * steps * gflop / 1e6
        hours = [pflop * 1e15 / (r * 1e12) / 3600 for r in rates]
        print(f"| {name} | {len(spec.variants)} x {seeds} | {steps} | {epochs_all:,.0f} | "
              f"{pflop:,.0f} | " + " | ".join(f"{h:,.1f}" for h in hours) + " |")


if __name__ == "__main__":
    main()

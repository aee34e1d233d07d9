"""The training loop's own cost per step: host round-trips against the steps' compute.

    python -m benchmarks.loop [--method maxl] [--width 16] [--batch 100] [--steps 24]
                              [--steps-per-call 1,4,24] [--epochs 3]

Runs ``train_and_evaluate`` (the real loop: data on the device, compiled steps gathering and
augmenting their batch by index, the non-finite checks, the running sums, progress off,
checkpoints at each epoch's end) on TFDS mock CIFAR-100 data with the small CNN, once per
``--config.steps_per_call``, and reports the median training-pass time per step of the epochs
after the first (evaluation and compilation are outside the pass's time).

The compute time of a step is that of the largest ``steps_per_call`` (by default the whole pass of
each kind in one compiled call: one host round-trip per pass); the loop's overhead per step at a
smaller ``steps_per_call`` is its extra time per step over that, as a percentage. A second column
compares with the step alone (``jax.jit(method.train_step)`` / ``meta_step`` on one fixed batch,
timed with ``block_until_ready``; without the in-graph gather and augmentation the loop's steps do).

Prints a markdown table (BENCHMARKS.md keeps it, with the command and the machine).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import tempfile

import jax
import numpy as np


def run_loop(args, steps_per_call: int, workdir: pathlib.Path) -> dict:
    import tensorflow_datasets as tfds

    from experiments.configs import cpu
    from maxl_jax import train

    config = cpu.get_config()
    config.method, config.arch, config.width = args.method, "small", args.width
    config.dataset, config.primary_level, config.data_dir = "cifar100", 20, ""
    config.batch_size, config.max_steps_per_epoch = args.batch, args.steps
    config.epochs, config.steps_per_call, config.eval_batch_size = args.epochs, steps_per_call, 100
    with tfds.testing.mock_data(num_examples=args.batch * args.steps,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        summary = train.train_and_evaluate(config, workdir, progress=False, log=lambda s: None)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [r["epoch_time"] for r in records[1:]]
    events = summary["steps_per_epoch"] + (int(summary["state"].meta_step) // args.epochs)
    return {"steps_per_call": steps_per_call, "epoch_s": statistics.median(per_epoch),
            "events": events, "state": summary["state"]}


def isolated_step_ms(args) -> tuple[float, float | None]:
    from benchmarks.methods import batch_for, build
    from benchmarks.steps import time_jax

    ns = argparse.Namespace(model="small", width=args.width, batch=args.batch)
    m = build(args.method, ns)
    state = jax.block_until_ready(m.init(jax.random.key(0), (32, 32, 3)))
    batch = jax.device_put(batch_for(m, ns, 0))
    train_ms = 1e3 * statistics.median(time_jax(m.train_step, state, batch, args.repeats)[0])
    meta_ms = None
    if m.has_meta:
        batches = {s: jax.device_put(batch_for(m, ns, 1 + i))
                   for i, s in enumerate(m.schedule.sources)}
        meta_ms = 1e3 * statistics.median(time_jax(m.meta_step, state, batches, args.repeats)[0])
    return train_ms, meta_ms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="maxl")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=24, help="training steps per epoch")
    p.add_argument("--steps-per-call", default="1,4,24")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="timings of the isolated steps")
    args = p.parse_args(argv)
    ks = sorted({int(k) for k in args.steps_per_call.split(",")})
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first epoch is not timed)")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            print(f"  steps_per_call={k} ...", file=sys.stderr, flush=True)
            rows.append(run_loop(args, k, pathlib.Path(tmp) / f"k{k}"))
    ref = rows[-1]
    for r in rows:  # the same numbers whatever the chunk size
        a = np.concatenate([np.ravel(np.asarray(x)) for x in
                            jax.tree_util.tree_leaves(r["state"].multitask_params)])
        b = np.concatenate([np.ravel(np.asarray(x)) for x in
                            jax.tree_util.tree_leaves(ref["state"].multitask_params)])
        r["max_param_diff"] = float(np.max(np.abs(a - b)))
    print("  isolated steps ...", file=sys.stderr, flush=True)
    train_ms, meta_ms = isolated_step_ms(args)
    spe = args.steps
    isolated_epoch_ms = spe * train_ms + (ref["events"] - spe) * (meta_ms or 0.0)

    print(f"Machine: {platform.processor() or platform.machine()}, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), jax {jax.__version__}")
    print(f"Method {args.method}, small CNN width {args.width}, batch {args.batch}, "
          f"{spe} training steps and {ref['events'] - spe} meta steps an epoch, median of "
          f"epochs 2..{args.epochs}.")
    print(f"Isolated steps: training {train_ms:.1f} ms"
          + (f", meta {meta_ms:.1f} ms" if meta_ms else "") + "\n")
    print("| steps per call | ms per step | overhead vs one call per pass | vs isolated steps "
          "| max param difference vs one call per pass |")
    print("| --- | --- | --- | --- | --- |")
    ref_ms = 1e3 * ref["epoch_s"] / ref["events"]
    for r in rows:
        ms = 1e3 * r["epoch_s"] / r["events"]
        print(f"| {r['steps_per_call']} | {ms:.1f} | {100 * (ms / ref_ms - 1):+.1f}% | "
              f"{100 * (1e3 * r['epoch_s'] / isolated_epoch_ms - 1):+.1f}% | "
              f"{r['max_param_diff']:.1e} |")


if __name__ == "__main__":
    main()

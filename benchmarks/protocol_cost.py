"""What each variant of a method-benchmark protocol costs, side by side in one process.

    python -m benchmarks.protocol_cost --protocol=emnist_letters_low
    python -m benchmarks.protocol_cost --protocol=fmnist10_low --variants=single,maxl_psi5 --repeats 3

For every variant of the protocol (``experiments.benchmark.PROTOCOLS``: the same config as its
runs, the protocol's image shape and training-set size): the median time of its training step and of
its meta step (compiled ahead of time, state not donated, after a warm-up), the steps per epoch of
each kind (its schedule on the protocol's training split, less a held-out split where the method
keeps one), the epoch's and the run's step time relative to single-task, and XLA's memory for the
larger of its two compiled steps (arguments + outputs + temporaries). Steps only: evaluation is the
same for every variant. The grid's wall times are noisier (several runs share the cores); this is
the cost to quote.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import jax
import numpy as np

from benchmarks.steps import _xla_bytes, cpu_model, num_cores, time_jax
from experiments import benchmark as B
from maxl_jax import methods

# (train images, primary classes, image shape, psi of the human task) of the protocols' data sets.
DATA = {"emnist_letters": (124_800, 26, (28, 28, 1), None),
        "fashion_mnist": (60_000, 10, (28, 28, 1), None),
        "fashion_mnist_coarse": (60_000, 5, (28, 28, 1), (4, 1, 1, 3, 1))}


def _batch(method, n_primary: int, shape, batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {"image": rng.normal(size=(batch, *shape)).astype(np.float32),
           "primary": rng.integers(0, n_primary, batch).astype(np.int32)}
    if method.aux_tasks:
        cols = []
        for task in method.aux_tasks:
            psi = np.asarray(task.psi)
            starts = np.concatenate([[0], np.cumsum(psi)[:-1]])
            p = out["primary"]
            cols.append(starts[p] + rng.integers(0, 1 << 20, batch) % psi[p])
        out["aux"] = np.stack(cols, 1).astype(np.int32)
    return out


def variant_row(protocol: str, variant: str, repeats: int, width: int) -> dict:
    spec = B.PROTOCOLS[protocol]
    config = B.cell_config(protocol, variant, 0, data_dir="unused", width=width)
    n_all, n_primary, shape, psi_human = DATA[spec.dataset]
    n_train = int(round(n_all * spec.train_fraction))
    held = methods.get(config.method).held_out_fraction_of(config)
    n_fit = n_train - int(round(n_train * held)) if held else n_train
    steps = n_fit // config.batch_size
    setup = methods.Setup(num_primary=n_primary, psi_human=psi_human, steps_per_epoch=steps,
                          dataset=spec.dataset)
    m = methods.build(config, setup)
    state = jax.block_until_ready(m.init(jax.random.key(0), shape))
    batch = jax.device_put(_batch(m, n_primary, shape, config.batch_size, 0))
    t_train = time_jax(m.train_step, state, batch, repeats)
    row = {"variant": variant, "method": config.method, "train_steps": steps,
           "train_ms": 1e3 * statistics.median(t_train[0]), "meta_steps": 0, "meta_ms": 0.0,
           "xla_bytes": t_train[4] or 0}
    if m.has_meta:
        meta_batches = {s: jax.device_put(_batch(m, n_primary, shape, config.batch_size, 1 + i))
                        for i, s in enumerate(m.schedule.sources)}
        t_meta = time_jax(m.meta_step, state, meta_batches, repeats)
        row["meta_steps"] = m.schedule.meta_steps_per_epoch(steps)
        row["meta_ms"] = 1e3 * statistics.median(t_meta[0])
        row["xla_bytes"] = max(row["xla_bytes"], t_meta[4] or 0)
    row["epoch_s"] = (row["train_steps"] * row["train_ms"] + row["meta_steps"] * row["meta_ms"]) / 1e3
    row["epochs"] = config.epochs
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=sorted(B.PROTOCOLS), required=True)
    p.add_argument("--variants", default="", help="comma-separated (default: all of the protocol)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--width", type=int, default=16)
    args = p.parse_args(argv)
    spec = B.PROTOCOLS[args.protocol]
    names = [v.strip() for v in args.variants.split(",") if v.strip()] or list(spec.variants)
    bad = sorted(set(names) - set(spec.variants))
    if bad:
        p.error(f"--variants: {bad} are not variants of {args.protocol}: {', '.join(spec.variants)}")
    if "single" not in names:
        names.insert(0, "single")
    dev = jax.devices()[0]
    print(f"# benchmarks.protocol_cost: {args.protocol} ({spec.dataset}, "
          f"{spec.train_fraction:.0%} of train), small CNN width {args.width}, batch 100, "
          f"{spec.epochs} epochs, {args.repeats} timed repeats")
    print(f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind}); {cpu_model()}, "
          f"{num_cores()} cores; Python {platform.python_version()}\n")
    rows = []
    for name in names:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        rows.append(variant_row(args.protocol, name, args.repeats, args.width))
    single = next(r for r in rows if r["variant"] == "single")
    print("| variant | training step | meta step | steps / epoch (train + meta) | epoch (steps) "
          "| epoch vs single | steps / run | XLA memory (larger step) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        meta = f"{r['meta_ms']:.1f} ms" if r["meta_steps"] else "-"
        print(f"| {r['variant']} | {r['train_ms']:.1f} ms | {meta} | {r['train_steps']} + "
              f"{r['meta_steps']} | {r['epoch_s']:.2f} s | {r['epoch_s'] / single['epoch_s']:.2f}x "
              f"| {r['epochs'] * (r['train_steps'] + r['meta_steps'])} | "
              f"{r['xla_bytes'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()

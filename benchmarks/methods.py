"""Cost of every method's steps, and of MAXL's meta-gradient estimators, on one network.

    python -m benchmarks.methods                       # small CNN, batch 100, CIFAR-100-20 shapes
    python -m benchmarks.methods --model vgg16 --methods maxl,wamal --repeats 3

For each method (its settings from ``experiments/configs/default.py``): the median time of its
training step and of its meta step (compiled ahead of time, state not donated, after a warm-up), its
steps per reference epoch (``50000 / batch`` training steps plus the meta steps its schedule adds)
and the epoch's cost relative to MAXL's. Then MAXL's meta step under each estimator: the exact
reverse-over-reverse unroll, forward-over-reverse, and the finite-difference first-order form of the
reference's ``model_vgg_maxl_firstorder.py``, with its error against the exact meta-gradient.

Prints markdown tables (BENCHMARKS.md keeps them, with the command and the machine).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import jax
import jax.flatten_util
import numpy as np

from benchmarks.steps import cpu_model, make_batch, num_cores, time_jax
from experiments.configs import default
from maxl_jax import maxl, methods

PSI = (5,) * 20
TRAIN_EXAMPLES = 50_000


def build(name: str, args) -> methods.Method:
    config = default.get_config()
    config.method, config.arch, config.width = name, args.model, args.width
    config.batch_size = args.batch
    setup = methods.Setup(num_primary=len(PSI), psi_human=PSI,
                          steps_per_epoch=TRAIN_EXAMPLES // args.batch, dataset="cifar100")
    return methods.build(config, setup)


def batch_for(method: methods.Method, args, seed: int) -> dict:
    batch = make_batch(args.batch, seed)
    if method.aux_tasks:
        rng = np.random.default_rng(seed + 100)
        cols = []
        for task in method.aux_tasks:
            psi = np.asarray(task.psi)
            starts = np.concatenate([[0], np.cumsum(psi)[:-1]])
            p = batch["primary"]
            cols.append(starts[p] + rng.integers(0, 1 << 20, len(p)) % psi[p])
        batch["aux"] = np.stack(cols, 1).astype(np.int32)
    return batch


def method_rows(names, args) -> list[dict]:
    rows = []
    for name in names:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        m = build(name, args)
        state = jax.block_until_ready(m.init(jax.random.key(0), (32, 32, 3)))
        batch = jax.device_put(batch_for(m, args, 0))
        train = time_jax(m.train_step, state, batch, args.repeats)
        row = {"method": name, "train_ms": 1e3 * statistics.median(train[0]),
               "train_compile_s": train[1], "meta_ms": None, "meta_compile_s": None}
        spe = TRAIN_EXAMPLES // args.batch
        row["meta_per_epoch"] = m.schedule.meta_steps_per_epoch(spe) if m.has_meta else 0
        if m.has_meta:
            meta_batches = {s: jax.device_put(batch_for(m, args, 1 + i))
                            for i, s in enumerate(m.schedule.sources)}
            meta = time_jax(m.meta_step, state, meta_batches, args.repeats)
            row["meta_ms"], row["meta_compile_s"] = 1e3 * statistics.median(meta[0]), meta[1]
        row["epoch_s"] = (spe * row["train_ms"] + row["meta_per_epoch"] * (row["meta_ms"] or 0)) / 1e3
        rows.append(row)
    return rows


def estimator_rows(args) -> list[dict]:
    """MAXL's meta step under each form, and each form's error against the exact reverse form."""
    rows, exact = [], None
    for form in ("reverse", "forward_over_reverse", "finite_difference"):
        print(f"  maxl meta step, {form} ...", file=sys.stderr, flush=True)
        config = default.get_config()
        config.arch, config.width, config.meta_form = args.model, args.width, form
        setup = methods.Setup(num_primary=len(PSI), psi_human=PSI,
                              steps_per_epoch=TRAIN_EXAMPLES // args.batch)
        m = methods.get("maxl").from_config(config, setup)
        state = jax.block_until_ready(m.init(jax.random.key(0), (32, 32, 3)))
        batch = jax.device_put(make_batch(args.batch, 1))
        out = time_jax(m.meta_step, state, {"train": batch}, args.repeats)
        grad = jax.jit(lambda s, b: maxl.generator_meta_gradient(
            m.multitask, m.generator, s.multitask_variables, m.generator_variables(s),
            b["image"], b["primary"], m.psi, inner_lr=0.01, form=form).grad)(state, batch)
        flat = np.asarray(jax.flatten_util.ravel_pytree(grad)[0], np.float64)
        exact = flat if exact is None else exact
        rows.append({"form": form, "ms": 1e3 * statistics.median(out[0]), "compile_s": out[1],
                     "rel_error": float(np.linalg.norm(flat - exact) / np.linalg.norm(exact))})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", choices=["small", "vgg16"])
    p.add_argument("--width", type=int, default=32, help="small CNN's first block's filters")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", default=",".join(methods.names()),
                   help="comma-separated method names (default: all)")
    p.add_argument("--no-estimators", action="store_true", help="skip MAXL's estimator table")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]

    dev = jax.devices()[0]
    print(f"# benchmarks.methods: {args.model}"
          + (f" (width {args.width})" if args.model == "small" else "")
          + f", batch {args.batch}, 32x32x3, psi [5]*20, {args.repeats} timed repeats")
    print(f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind}); "
          f"{cpu_model()}, {num_cores()} cores; Python {platform.python_version()}\n")
    rows = method_rows(names, args)
    maxl_epoch = next((r["epoch_s"] for r in rows if r["method"] == "maxl"), None)
    print("| method | training step | meta step | meta steps / epoch | epoch (steps only) | "
          "epoch vs MAXL | compile (train / meta) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        meta = f"{r['meta_ms']:.1f} ms" if r["meta_ms"] is not None else "-"
        ratio = f"{r['epoch_s'] / maxl_epoch:.2f}x" if maxl_epoch else "-"
        comp = f"{r['train_compile_s']:.1f} / " + (f"{r['meta_compile_s']:.1f} s"
                                                     if r["meta_compile_s"] is not None else "- s")
        print(f"| {r['method']} | {r['train_ms']:.1f} ms | {meta} | {r['meta_per_epoch']} | "
              f"{r['epoch_s']:.1f} s | {ratio} | {comp} |")
    if args.no_estimators:
        return
    print("\nMAXL's meta step by estimator (error: ||g - g_exact|| / ||g_exact|| against the reverse "
          "form, float32, same weights and batch):\n")
    print("| estimator | meta step | vs reverse | relative error | compile |")
    print("| --- | --- | --- | --- | --- |")
    est = estimator_rows(args)
    for r in est:
        print(f"| {r['form']} | {r['ms']:.1f} ms | {est[0]['ms'] / r['ms']:.2f}x faster | "
              f"{r['rel_error']:.1e} | {r['compile_s']:.1f} s |")


if __name__ == "__main__":
    main()

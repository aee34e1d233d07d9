"""Interleaved A/B of the MAXL steps: JAX per conv implementation against the lean PyTorch port.

    python -m benchmarks.ab_steps [--model vgg16] [--step theta1|theta2] [--impls patches,hybrid]
                                  [--rounds 7] [--torch-threads 2] [--profile DIR]

``benchmarks.steps`` times each configuration in its own block of repeats; on a shared VM whose speed
drifts by up to 30% between minutes, that makes ratios between configurations unreliable. Here every
round runs each configuration once, in turn (JAX steps compiled ahead of time, the PyTorch step of
``benchmarks/torch_reference.py`` without the reference's extra passes), so each round's ratio
compares runs seconds apart. Printed: a table of the median and the minimum per configuration, the
median over rounds of ``PyTorch time / this time`` (> 1: faster than PyTorch), and every run.

``--profile DIR`` also traces one call of each JAX step (time per XLA op kind, as ``benchmarks.steps
--profile``) and one PyTorch step (``torch.profiler``, self CPU time per aten op): the per-op
account of where each framework's time goes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from benchmarks import steps as S
from maxl_jax import conv as conv_lib

TORCH = "PyTorch (lean port)"


def _jax_fns(model: str, step: str, impls: list[str], batch):
    state, args, fns, compiled = None, None, {}, {}
    for impl in impls:
        m = S.build_maxl(model, impl, "reverse")
        if state is None:  # the parameters depend on neither the conv nor the dtype
            state = jax.block_until_ready(m.init(jax.random.key(0), (32, 32, 3)))
            args = (state, batch) if step == "theta1" else (state, {"train": batch})
        fn = m.train_step if step == "theta1" else m.meta_step
        print(f"  compiling JAX {step}, conv {impl} ...", file=sys.stderr, flush=True)
        compiled[impl] = jax.jit(fn).lower(*args).compile()
        jax.block_until_ready(compiled[impl](*args))  # warm-up
        fns[f"JAX, conv {impl}"] = (lambda c=compiled[impl]: jax.block_until_ready(c(*args)))
    return state, args, fns, compiled


def _torch_fn(step: str, state, batch_np, threads: int):
    import torch

    from benchmarks import torch_reference as tr

    torch.set_num_threads(threads)
    inputs = S.torch_inputs(state, batch_np)
    step_fn = tr.theta1_step if step == "theta1" else tr.theta2_step
    fn = lambda: step_fn(*inputs, S.PSI)  # noqa: E731
    fn()  # warm-up
    return fn


def _torch_profile(fn, top: int = 15):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / 1e3
    return total, [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in rows[:top]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("vgg16", "small"), default="vgg16")
    ap.add_argument("--step", choices=("theta1", "theta2"), default="theta1")
    ap.add_argument("--impls", default="patches,hybrid",
                    help="comma-separated maxl_jax.conv implementations of the JAX networks")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--torch-threads", type=int, default=S.num_cores())
    ap.add_argument("--notorch", dest="torch", action="store_false",
                    help="JAX only (no ratio column)")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="also print a per-op profile of one call of each step")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.batch < 1:
        ap.error(f"--rounds and --batch must be >= 1, got {args.rounds} and {args.batch}")
    impls = args.impls.split(",")
    for impl in impls:
        if impl not in conv_lib.IMPLS:
            ap.error(f"--impls: unknown implementation {impl!r}; choose from "
                     f"{', '.join(conv_lib.IMPLS)}")

    versions = f"jax {jax.__version__}"
    if args.torch:
        import torch
        versions += f", torch {torch.__version__} ({args.torch_threads} threads)"
    print(f"# Interleaved A/B: MAXL {args.step} step, {args.model}\n\n"
          f"command: python -m benchmarks.ab_steps {' '.join(argv or sys.argv[1:])}\n"
          f"machine: {S.cpu_model()}, {S.num_cores()} cores usable; {versions}; batch {args.batch}; "
          f"{args.rounds} rounds, each running every configuration once, in turn, after a warm-up; "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

    batch_np = S.make_batch(args.batch)
    state, jargs, fns, compiled = _jax_fns(args.model, args.step, impls, jax.device_put(batch_np))
    if args.torch:
        print("  PyTorch warm-up ...", file=sys.stderr, flush=True)
        fns[TORCH] = _torch_fn(args.step, state, batch_np, args.torch_threads)

    times = {k: [] for k in fns}
    for r in range(args.rounds):
        print(f"  round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    ref = np.asarray(times.get(TORCH, []))
    print("| configuration | median ms | min ms | PyTorch/this, median over rounds | runs (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for name, ts in times.items():
        ts = np.asarray(ts)
        ratio = f"{np.median(ref / ts):.2f}x" if ref.size else "-"
        print(f"| {name} | {1e3 * np.median(ts):.0f} | {1e3 * ts.min():.0f} | {ratio} | "
              f"{', '.join(f'{1e3 * t:.0f}' for t in ts)} |")

    if args.profile:
        for impl, c in compiled.items():
            total, rows = S.op_profile(c, jargs, os.path.join(args.profile, f"jax_{impl}"))
            print(f"\nJAX, conv {impl}: one call, {total:.0f} ms of XLA ops in all (ops can overlap "
                  f"on the cores)\n\n| XLA op kind | ms | count |\n| --- | --- | --- |")
            for kind, ms, n in rows[:15]:
                print(f"| {kind} | {ms:.1f} | {n} |")
        if args.torch:
            total, rows = _torch_profile(fns[TORCH])
            print(f"\nPyTorch: one call, {total:.0f} ms of self CPU time in all\n\n"
                  "| aten op | self ms | count |\n| --- | --- | --- |")
            for key, ms, n in rows:
                print(f"| {key} | {ms:.1f} | {n} |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

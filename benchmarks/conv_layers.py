"""Time every distinct 3x3 convolution of CIFAR VGG-16 with each ``maxl_jax.conv`` implementation.

    python -m benchmarks.conv_layers [--batch 100] [--repeats 3] [--second-order]
                                     [--impls xla,shifted_matmul,patches]

For each layer shape: forward, and forward + backward (the output and its VJP w.r.t. input, kernel
and bias; the first layer's input gradient is not requested, as in a real network), each
``jax.jit``-compiled, timed with ``block_until_ready``, median of ``--repeats`` runs after a warm-up; implementations are interleaved
within each repeat so that load changes hit all of them alike. ``--second-order`` adds a meta-style
column: gradient w.r.t. (input, kernel) of a loss evaluated at ``kernel - lr * dL/dkernel``.
Prints markdown tables: per layer (ms, GFLOP/s, speedup vs xla) and totals over VGG-16's 13 convs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from maxl_jax.conv import conv3x3, select_impl

FILTERS = (64, 128, 256, 512, 512)
CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


def vgg16_layers(size=32):
    """Distinct (spatial, cin, cout) -> count, in network order, for CIFAR VGG-16."""
    layers, cin, s = {}, 3, size
    for f, n in zip(FILTERS, CONVS_PER_BLOCK):
        for _ in range(n):
            layers[(s, cin, f)] = layers.get((s, cin, f), 0) + 1
            cin = f
        s //= 2
    return layers


def _fns(impl, first):
    """Jitted forward, forward+backward and (optional) second-order functions of one layer."""
    conv = lambda x, k, b: conv3x3(x, k, b, impl=impl)  # noqa: E731

    def fwd_bwd(x, k, b, c):  # output and its VJP with cotangent c (forward cannot be skipped)
        if first:  # a network never needs the gradient w.r.t. its input images
            y, vjp = jax.vjp(lambda k, b: conv(x, k, b), k, b)
        else:
            y, vjp = jax.vjp(conv, x, k, b)
        return y, vjp(c)

    def meta(x, k, b, c):  # loss after one differentiated SGD step on the kernel
        inner = lambda k_: 0.5 * jnp.mean(conv(x, k_, b) ** 2)  # noqa: E731
        return jnp.vdot(conv(x, k - 0.01 * jax.grad(inner)(k), b), c)

    return {"fwd": jax.jit(conv), "fwd+bwd": jax.jit(fwd_bwd),
            "2nd order": jax.jit(jax.value_and_grad(meta, argnums=(1, 2) if first else (0, 1, 2)))}


def _run(f, args):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default="xla,shifted_matmul,patches")
    ap.add_argument("--second-order", action="store_true")
    args = ap.parse_args(argv)
    impls = args.impls.split(",")
    modes = ["fwd", "fwd+bwd"] + (["2nd order"] if args.second_order else [])
    layers = vgg16_layers()
    n = args.batch
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, batch {n}, "
          f"median of {args.repeats} after a warm-up (ms; GFLOP/s from nominal conv FLOPs)\n")

    times = {}  # (layer, impl, mode) -> seconds
    for li, (s, cin, cout) in enumerate(layers):
        key = jax.random.key(li)
        kx, kk, kb, kc = jax.random.split(key, 4)
        x = jax.random.normal(kx, (n, s, s, cin), jnp.float32)
        k = jax.random.normal(kk, (3, 3, cin, cout), jnp.float32) * (2.0 / (9 * cin)) ** 0.5
        b = jax.random.normal(kb, (cout,), jnp.float32)
        c = jax.random.normal(kc, (n, s, s, cout), jnp.float32)
        jobs = []
        for impl in impls:
            fns = _fns(impl, first=(li == 0))
            for mode in modes:
                a = (x, k, b) if mode == "fwd" else (x, k, b, c)
                _run(fns[mode], a)  # compile + warm-up
                jobs.append(((s, cin, cout), impl, mode, fns[mode], a))
        samples = {j[:3]: [] for j in jobs}
        for _ in range(args.repeats):
            for lay, impl, mode, f, a in jobs:
                samples[(lay, impl, mode)].append(_run(f, a))
        times.update({kk_: float(np.median(v)) for kk_, v in samples.items()})

    def flops(lay, mode, first):
        s, cin, cout = lay
        fwd = 2.0 * n * s * s * 9 * cin * cout
        return {"fwd": fwd, "fwd+bwd": fwd * (2 if first else 3)}.get(mode)

    hdr = "| layer (HxW, Cin->Cout) | x | impl |"
    sep = "| --- | --- | --- |"
    for mode in modes:
        hdr += f" {mode} ms | GFLOP/s | vs xla |"
        sep += " --- | --- | --- |"
    print(hdr + "\n" + sep)
    for li, (lay, cnt) in enumerate(layers.items()):
        s, cin, cout = lay
        auto = select_impl((n, s, s, cin), (3, 3, cin, cout))
        for impl in impls:
            row = f"| {s}x{s}, {cin}->{cout} | {cnt} | {impl}{' (auto)' if impl == auto else ''} |"
            for mode in modes:
                t = times[(lay, impl, mode)]
                fl = flops(lay, mode, li == 0)
                gf = f"{fl / t / 1e9:.1f}" if fl else "-"
                sp = (f"{times[(lay, 'xla', mode)] / t:.2f}x" if "xla" in impls else "-")
                row += f" {t * 1e3:.1f} | {gf} | {sp} |"
            print(row)

    print("\nWhole VGG-16 stack (sum over its 13 convs):\n")
    hdr, sep = "| impl |", "| --- |"
    for mode in modes:
        hdr += f" {mode} ms | vs xla |"
        sep += " --- | --- |"
    print(hdr + "\n" + sep)
    totals = {}
    for impl in impls + ["auto", "best per layer"]:
        for mode in modes:
            tot = 0.0
            for lay, cnt in layers.items():
                s, cin, cout = lay
                if impl == "auto":
                    pick = select_impl((n, s, s, cin), (3, 3, cin, cout))
                    if pick not in impls:
                        tot = float("nan")
                        break
                    t = times[(lay, pick, mode)]
                elif impl == "best per layer":
                    t = min(times[(lay, i, mode)] for i in impls)
                else:
                    t = times[(lay, impl, mode)]
                tot += cnt * t
            totals[(impl, mode)] = tot
    for impl in impls + ["auto", "best per layer"]:
        if impl == "auto" and any(np.isnan(totals[(impl, mode)]) for mode in modes):
            picks = sorted({select_impl((n, s, s, cin), (3, 3, cin, cout))
                            for s, cin, cout in layers} - set(impls))
            print(f"| auto | not timed: it also picks {', '.join(picks)} (add to --impls) |")
            continue
        row = f"| {impl} |"
        for mode in modes:
            t = totals[(impl, mode)]
            sp = f"{totals[('xla', mode)] / t:.2f}x" if "xla" in impls else "-"
            row += f" {t * 1e3:.0f} | {sp} |"
        print(row)


if __name__ == "__main__":
    main()

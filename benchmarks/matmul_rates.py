"""The CPU's matrix-product rate in XLA: a large square product and VGG-16's im2col products.

    python -m benchmarks.matmul_rates [--batch 100] [--repeats 5] [--square 4096] [--torch]

A ceiling for the convolution forms that are matrix products (``maxl_jax.conv``'s ``"patches"``,
and XLA's own convolutions, which run in the same kernels on XLA:CPU): for every distinct 3x3
convolution of CIFAR VGG-16 at this batch, the forward im2col product ``(N*H*W, 9*Cin) @ (9*Cin,
Cout)`` alone (the copies that build its left operand are not timed), and an ``n x n`` square
product. ``--torch`` times the same products in PyTorch (``torch.matmul``, its default threads) for
comparison. Prints one markdown table: shape, GFLOP/s (median of ``--repeats`` after a warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import steps as S
from benchmarks.conv_layers import vgg16_layers


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def jax_rate(m: int, k: int, n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    f = jax.jit(jnp.matmul).lower(a, b).compile()
    return 2.0 * m * k * n / _median_s(lambda: jax.block_until_ready(f(a, b)), repeats)


def torch_rate(m: int, k: int, n: int, repeats: int) -> float:
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2.0 * m * k * n / _median_s(lambda: torch.matmul(a, b), repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--square", type=int, default=4096, help="n of the n x n product (0: none)")
    ap.add_argument("--torch", action="store_true", help="also time the products in PyTorch")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.square < 0:
        ap.error("--batch and --repeats must be >= 1 and --square >= 0, got "
                 f"{args.batch}, {args.repeats} and {args.square}")

    shapes = [(f"{args.square}^3 square", args.square, args.square, args.square)] if args.square else []
    for (s, cin, cout), count in vgg16_layers().items():
        shapes.append((f"VGG-16 {s}x{s}, {cin}->{cout} (x{count})", args.batch * s * s, 9 * cin, cout))

    versions = f"jax {jax.__version__}"
    if args.torch:
        import torch
        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(f"# Matrix-product rates, float32\n\n"
          f"command: python -m benchmarks.matmul_rates {' '.join(argv or sys.argv[1:])}\n"
          f"machine: {S.cpu_model()}, {S.num_cores()} cores usable; {versions}; backend "
          f"{jax.default_backend()}; median of {args.repeats} after a warm-up\n")
    head = "| product | M x K x N | JAX GFLOP/s |" + (" PyTorch GFLOP/s |" if args.torch else "")
    print(head + "\n|" + " --- |" * head.count(" |"))
    for name, m, k, n in shapes:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        row = f"| {name} | {m} x {k} x {n} | {jax_rate(m, k, n, args.repeats) / 1e9:.0f} |"
        if args.torch:
            row += f" {torch_rate(m, k, n, args.repeats) / 1e9:.0f} |"
        print(row)


if __name__ == "__main__":
    main()

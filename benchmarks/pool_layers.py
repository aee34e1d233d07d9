"""Time CIFAR VGG-16's five 2x2 max-pools: flax's ``nn.max_pool`` against ``models.max_pool_2x2``.

    python -m benchmarks.pool_layers [--batch 100] [--repeats 5]

Per pooled feature map (after a ReLU, as in the backbone): the gradient of ``sum(sin(pool(relu(z))))``
w.r.t. ``z`` ("fwd+bwd") and a Hessian-vector product of the same ("2nd order", what MAXL's meta
step adds), each ``jax.jit``-compiled, median of ``--repeats`` runs after a warm-up, the two
implementations interleaved within each repeat so that load changes hit both alike.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxl_jax import models

SHAPES = ((32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (2, 2, 512))


def flax_max_pool_2x2(x):
    """The backbone's pool before the CPU fix (``select_and_scatter_add`` gradient)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2))


IMPLS = {"nn.max_pool": flax_max_pool_2x2, "max_pool_2x2": models.max_pool_2x2}


def _fns(pool):
    loss = lambda z: jnp.sum(jnp.sin(pool(jax.nn.relu(z))))  # noqa: E731
    return {"fwd+bwd": jax.jit(jax.grad(loss)),
            "2nd order": jax.jit(lambda z, v: jax.jvp(jax.grad(loss), (z,), (v,))[1])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    fns = {name: _fns(pool) for name, pool in IMPLS.items()}
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, batch {args.batch}, median of "
          f"{args.repeats} after a warm-up (ms)\n")
    print("| feature map | mode | nn.max_pool | max_pool_2x2 | speedup |\n| --- | --- | --- | --- | --- |")
    for h, w, c in SHAPES:
        z = jax.random.normal(jax.random.key(0), (args.batch, h, w, c)) - 0.3
        v = jax.random.normal(jax.random.key(1), z.shape)
        for mode in ("fwd+bwd", "2nd order"):
            call = {n: (lambda f=f[mode]: f(z) if mode == "fwd+bwd" else f(z, v)) for n, f in fns.items()}
            for c_ in call.values():
                jax.block_until_ready(c_())
            times = {n: [] for n in call}
            for _ in range(args.repeats):
                for n, c_ in call.items():
                    t = time.perf_counter()
                    jax.block_until_ready(c_())
                    times[n].append(time.perf_counter() - t)
            med = {n: sorted(t)[len(t) // 2] * 1e3 for n, t in times.items()}
            print(f"| {h}x{w}x{c} | {mode} | {med['nn.max_pool']:.1f} | {med['max_pool_2x2']:.1f} | "
                  f"{med['nn.max_pool'] / med['max_pool_2x2']:.1f}x |")


if __name__ == "__main__":
    main()

"""Interleaved A/B of conv implementations on whole MAXL steps (experiment; see BENCHMARKS.md).

    python -m benchmarks.conv_ab_steps vgg16 patches,auto theta1 5
"""
import sys
import time

import jax

from benchmarks.steps import build_maxl, make_batch

model, impls, which, reps = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(","), int(sys.argv[4])
batch = jax.device_put(make_batch(100))
state, fns = None, {}
for impl in impls:
    m = build_maxl(model, impl, "reverse")
    if state is None:
        state = jax.block_until_ready(m.init(jax.random.key(0), (32, 32, 3)))
    for st in which:
        fns[(impl, st)] = jax.jit(getattr(m, st + "_step")).lower(state, batch).compile()
        jax.block_until_ready(fns[(impl, st)](state, batch))
times = {k: [] for k in fns}
for _ in range(reps):  # interleaved, so that load changes hit every variant alike
    for k, f in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(f(state, batch))
        times[k].append(time.perf_counter() - t)
for k, v in times.items():
    v = sorted(v)
    print(k, f"median {v[len(v) // 2] * 1e3:.0f} ms, all {[round(x * 1e3) for x in v]}")

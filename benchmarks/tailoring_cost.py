"""What tailoring costs at prediction time: one jitted eval_step of ``single`` (the plain forward)
against ``tailoring`` with 1 and 5 inner steps, on the same network, state and test batch.

    python -m benchmarks.tailoring_cost [--arch small --width 8 --batch 256 --repeats 20]

Writes benchmarks/results/tailoring_cost.md (the command on top). The machine is shared: the
times are medians of ``repeats`` calls after one compiling call, with the load average recorded.
"""

import argparse
import os
import pathlib
import sys
import time

import jax
import numpy as np
import optax

from maxl_jax import methods, models

OUT = pathlib.Path(__file__).resolve().parent / "results" / "tailoring_cost.md"


def median_time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="small")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    mt, _ = models.make_networks(a.arch, 20, 100, 100, width=a.width, image_shape=(32, 32, 3))
    opt = optax.sgd(0.1)
    single = methods.get("single")(multitask=mt, multitask_optimizer=opt)
    state = single.init(jax.random.PRNGKey(0), (32, 32, 3))
    batch = {"image": jax.random.normal(jax.random.PRNGKey(1), (a.batch, 32, 32, 3)),
             "primary": jax.numpy.arange(a.batch) % 20}
    rows = [("plain forward (single's eval_step)", median_time(jax.jit(single.eval_step), state,
                                                               batch, repeats=a.repeats))]
    for steps in (1, 5):
        m = methods.get("tailoring")(multitask=mt, multitask_optimizer=opt, inner_steps=steps)
        rows.append((f"tailoring, inner_steps={steps}",
                     median_time(jax.jit(m.eval_step), state, batch, repeats=a.repeats)))
    base = rows[0][1]
    lines = [f"    python -m benchmarks.tailoring_cost {' '.join(argv or sys.argv[1:])}".rstrip(), "",
             f"arch {a.arch}, width {a.width}, one test batch of {a.batch} 32x32x3 images, "
             f"{jax.devices()[0].platform}, {os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.1f}; median of {a.repeats} jitted calls", "",
             "| evaluation | ms per batch | vs plain |", "| --- | --- | --- |"]
    lines += [f"| {name} | {t * 1e3:.2f} | {t / base:.2f}x |" for name, t in rows]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

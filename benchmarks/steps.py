"""Time MAXL's two training steps, JAX against the PyTorch reference port, in one process.

    python -m benchmarks.steps [--model vgg16|small|both] [--batch 100] [--repeats 2]
                               [--conv-impl auto[,xla,...]] [--forms reverse,forward_over_reverse]
                               [--dtype float32[,bfloat16,float16]] [--matmul-precision P]
                               [--torch | --notorch] [--torch-threads N[,M]] [--no-original-cost]
                               [--torch-autocast] [--pool library|reduce_window] [--profile DIR]

Rows, for each model (same weights, same random batch of 32x32x3 images, CIFAR-100's psi = [5]*20):

* JAX theta1 step (``Maxl.train_step``) and theta2 step (``Maxl.meta_step``) for each
  meta-gradient form, each ``--conv-impl`` and each ``--dtype`` (the networks' compute dtype,
  ``maxl_jax.precision``: float32 parameters, losses and meta-gradients whichever it is), compiled
  ahead of time (``jax.jit(...).lower().compile()``), timed with ``jax.block_until_ready``;
  ``--matmul-precision`` sets ``jax_default_matmul_precision`` for the whole process (on GPUs:
  ``float32``/``highest`` for true float32 matmuls and convolutions, ``tensorfloat32``/``high`` for
  TF32 tensor cores);
* PyTorch (``benchmarks/torch_reference.py``): theta1 step; theta1 "as the reference runs it" (its two
  extra diagnostic backward passes for the gradient cosine similarity, and its backward also running
  into g's parameters); theta2 step; theta2 as the reference runs it (its ``.backward()`` also
  computes gradients of f's parameters, then discarded). ``torch.set_num_threads`` = the cores this
  process may use (``--torch-threads`` to change). ``--torch-autocast`` adds the theta1 and theta2
  steps under ``torch.autocast(dtype=torch.bfloat16)`` (PyTorch's mixed precision: convolutions and
  matmuls in bfloat16, BatchNorm, softmax and losses float32).

Every step is run once (warm-up; for JAX after compiling), then ``--repeats`` times; the table shows the
median. Columns:

* ms/step, images/s (batch / median time);
* speed ratio: PyTorch time of the same step / JAX time (> 1: JAX faster); theta1 rows against the
  PyTorch theta1 step without diagnostics, theta2 rows against the PyTorch theta2 step, each at the
  fastest of the ``--torch-threads`` counts timed (on a shared 2-core machine two OpenMP threads can
  be far slower than one);
* compile s: JAX ``lower()`` + ``compile()`` wall time;
* memory: on the CPU, host RSS growth during the first (warm-up) run, sampled every millisecond by a
  thread (JAX and PyTorch alike), and for JAX also XLA's buffer sizes from ``compiled.memory_analysis()``
  (arguments + outputs + temporaries); on a GPU, peak device memory (``jax`` ``memory_stats`` /
  ``torch.cuda.max_memory_allocated``);
* GFLOP: XLA's cost analysis of the compiled JAX step (``compiled.cost_analysis()['flops']``). PyTorch
  rows use the count of the JAX step that does the same useful work (theta1, theta2 'reverse'): the
  reference's extra diagnostic / discarded work is not counted as useful;
* % of peak: achieved FLOP rate / the device's peak *for the precision the row computes in*. On the
  CPU the peak is *measured in the same run* as the median rate of a large matrix product in that
  dtype (``--peak-matmul N``, JAX); on a GPU the dense spec-sheet peak of :data:`GPU_PEAKS` (float32,
  TF32 or bfloat16/float16 tensor cores) when the device is known, else the measured matmul
  (``--peak-tflops`` overrides all).

``--profile DIR`` adds, per JAX step, the time of one traced call summed by XLA op kind (``ynn_fusion``:
XLA:CPU's matrix products; ``concatenate`` / ``pad_slice_fusion``: the im2col copies of the "patches"
convolution; ...).

A second table projects one reference epoch (50000 / batch theta1 steps + as many theta2 steps: 500 + 500
at batch 100) and the full 200-epoch run, next to the reference's reported ~30 hours on a GTX 1080.
The machine may be shared: the load average is printed before and after; rerun if it moved a lot.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxl_jax import models, steps
from maxl_jax.methods.maxl import Maxl

PSI = [5] * 20  # CIFAR-100: 20 superclasses x 5 auxiliary classes
TRAIN_EXAMPLES = 50_000
EPOCHS = 200
REFERENCE_HOURS = 30.0  # MAXL on a GTX 1080, as reported by the reference's authors
FORMS = ("reverse", "forward_over_reverse")
# Dense (no sparsity) spec-sheet peaks in FLOP/s by precision: plain float32 (CUDA cores), TF32 and
# bfloat16 (= float16) tensor cores. NVIDIA's data sheets (H100 and H200 SXM; H100 PCIe; A100 SXM).
# The first name contained in the device kind wins, so "H100 PCIe" comes before "H100".
GPU_PEAKS = {
    "H100 PCIe": {"fp32": 51e12, "tf32": 378e12, "bf16": 756e12},
    "H100": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "H200": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
}
DTYPES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------- helpers
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Context manager: peak resident set size growth (bytes) while the block runs, sampled by a
    thread every ``interval`` seconds."""

    def __init__(self, interval: float = 1e-3):
        self.interval, self.growth = interval, 0

    def __enter__(self):
        self._base = self._peak = rss_bytes()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.growth = self._peak - self._base


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def fmt_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


@dataclasses.dataclass
class Row:
    model: str
    framework: str  # "JAX" | "PyTorch"
    step: str  # "theta1" | "theta2"
    variant: str  # e.g. "reverse, conv auto" / "+ diagnostics (as run by the reference)"
    times: list
    compile_s: float | None = None
    rss_growth: int | None = None
    device_peak: int | None = None
    xla_bytes: int | None = None
    flops: float | None = None  # XLA count of this step (JAX) or of the equivalent JAX step
    profile: tuple | None = None  # op_profile's result (JAX, --profile)
    batch: int = 0
    key: str = ""  # identifies the row for ratios / projections
    precision: str = "fp32"  # "fp32" | "tf32" | "bf16": which peak '% of peak' divides by

    @property
    def median(self) -> float:
        return statistics.median(self.times)


# --------------------------------------------------------------------------------------- peak
def measure_matmul_peak(n: int, repeats: int, dtype=jnp.float32) -> float:
    """Median FLOP/s of an (n x n) @ (n x n) product in ``dtype`` in JAX on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(f(a, b))
    ts = []
    for _ in range(max(repeats, 3)):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        ts.append(time.perf_counter() - t)
    return 2.0 * n ** 3 / statistics.median(ts)


def row_precision(dtype: str, matmul_precision: str | None = None) -> str:
    """The peak a JAX row's matmuls run at: ``"bf16"`` for a bfloat16/float16 network; for float32,
    ``"fp32"`` on the CPU or at ``float32``/``highest`` matmul precision, else ``"tf32"`` on a GPU
    (XLA's default and ``tensorfloat32``/``high`` use TF32 tensor cores on Ampere and newer)."""
    if dtype in ("bfloat16", "float16"):
        return "bf16"
    if jax.default_backend() != "gpu":
        return "fp32"
    mp = (matmul_precision or "default").lower()
    return "fp32" if mp in ("float32", "highest", "fp32") else "tf32"


def device_peaks(args, measured: dict) -> dict:
    """``{"fp32" | "tf32" | "bf16": (FLOP/s, where it comes from)}`` for this device.

    ``measured`` maps ``"fp32"`` and ``"bf16"`` to this run's matmul rates (float32, bfloat16)."""
    dev = jax.devices()[0]
    if args.peak_tflops:
        return {k: (args.peak_tflops * 1e12, "given with --peak-tflops")
                for k in ("fp32", "tf32", "bf16")}
    if dev.platform == "gpu":
        for name, peaks in GPU_PEAKS.items():
            if name in dev.device_kind:
                return {k: (v, f"{dev.device_kind} spec sheet, {k} dense") for k, v in peaks.items()}
    n = args.peak_matmul
    out = {k: (v, f"measured: {n}x{n} {'float32' if k == 'fp32' else 'bfloat16'} matmul in JAX "
                  f"in this run") for k, v in measured.items()}
    out.setdefault("tf32", out["fp32"])
    return out


# --------------------------------------------------------------------------------------- JAX
def build_maxl(model: str, conv_impl: str, form: str, dtype: str = "float32") -> Maxl:
    f, g = models.make_networks(model, len(PSI), sum(PSI), sum(PSI), conv_impl=conv_impl,
                                dtype=dtype)
    f_opt, g_opt, inner_lr = steps.reference_optimizers(steps_per_epoch=TRAIN_EXAMPLES // 100)
    return Maxl(multitask=f, multitask_optimizer=f_opt, generator=g, psi=PSI,
                generator_optimizer=g_opt, inner_lr=inner_lr, meta_form=form)


def make_batch(batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
            "primary": rng.integers(0, len(PSI), size=batch).astype(np.int32)}


def _flops_of(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost["flops"])
    except Exception:  # noqa: BLE001 - cost analysis is best effort
        return None


def _xla_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001
        return None


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def op_profile(compiled, args_, trace_dir: str) -> tuple[float, list]:
    """Trace one call of ``compiled(*args_)`` with ``jax.profiler`` and sum the time of XLA's
    executed ops (thunks / kernels) by op kind (the HLO name without its ``.N`` suffix).

    Returns ``(total op ms, [(kind, ms, count), ...])`` sorted by time. On a multi-threaded CPU the
    total can exceed the wall time (ops run concurrently)."""
    import collections
    import glob
    import gzip
    import json
    import re
    import shutil

    shutil.rmtree(trace_dir, ignore_errors=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        jax.block_until_ready(compiled(*args_))
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    ms, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith("$") or "::" in name or name.startswith("Pjit"):
            continue  # python frames and runtime bookkeeping, not XLA ops
        kind = re.sub(r"\.\d+$", "", name)
        ms[kind] += e.get("dur", 0) / 1e3
        count[kind] += 1
    return sum(ms.values()), [(k, v, count[k]) for k, v in ms.most_common()]


def time_jax(fn: Callable, state, batch, repeats: int, profile_dir: str | None = None):
    """Compile ``fn(state, batch)`` ahead of time; returns (times, compile_s, rss_growth,
    device_peak, xla_bytes, flops, op profile or None). The state is not donated, so every call
    does the same work."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    with RssPeak() as mem:
        jax.block_until_ready(compiled(state, batch))  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - t)
    prof = op_profile(compiled, (state, batch), profile_dir) if profile_dir else None
    return (times, compile_s, mem.growth, _device_peak_bytes(), _xla_bytes(compiled),
            _flops_of(compiled), prof)


def jax_rows(model: str, args, batch_np: dict) -> tuple[list, object]:
    rows = []
    state = None
    batch = jax.device_put(batch_np)
    for dtype in args.dtype:
        prec = row_precision(dtype, args.matmul_precision)
        for impl in args.conv_impl:
            # the label of this implementation and dtype in keys and variants ("/"-free)
            cfg = impl if dtype == "float32" else f"{impl} {dtype}"
            base = build_maxl(model, impl, FORMS[0], dtype)
            if state is None:  # the parameters depend on neither the conv nor the dtype
                state = jax.block_until_ready(base.init(jax.random.key(0), (32, 32, 3)))
            print(f"  JAX theta1, conv {cfg} ...", file=sys.stderr, flush=True)
            out = time_jax(base.train_step, state, batch, args.repeats, args.profile)
            rows.append(Row(model, "JAX", "theta1", f"conv {cfg}", *out, batch=args.batch,
                            key=f"jax/theta1/{cfg}", precision=prec))
            for form in args.forms:
                print(f"  JAX theta2 {form}, conv {cfg} ...", file=sys.stderr, flush=True)
                m = build_maxl(model, impl, form, dtype)
                out = time_jax(m.meta_step, state, {"train": batch}, args.repeats, args.profile)
                rows.append(Row(model, "JAX", "theta2", f"{form}, conv {cfg}", *out,
                                batch=args.batch, key=f"jax/theta2/{form}/{cfg}", precision=prec))
    return rows, state


# --------------------------------------------------------------------------------------- torch
def torch_inputs(state, batch_np: dict, device: str = "cpu") -> tuple:
    """The arguments of ``torch_reference``'s steps for this MAXL state and batch, before ``PSI``:
    ``(multitask params, multitask stats, generator params, generator stats, images, labels)``."""
    import torch

    from benchmarks import torch_reference as tr

    fp, fs = tr.flax_to_torch(jax.device_get(state.multitask_params),
                              jax.device_get(state.multitask_batch_stats), device=device)
    gp, gs = tr.flax_to_torch(jax.device_get(state.method_state["params"]),
                              jax.device_get(state.method_state["batch_stats"]), device=device)
    x = tr.images_from_nhwc(batch_np["image"], device=device)
    y = torch.tensor(batch_np["primary"], dtype=torch.int64, device=device)
    return fp, fs, gp, gs, x, y


def torch_rows(model: str, args, state, batch_np: dict, threads: int) -> list:
    import torch

    from benchmarks import torch_reference as tr

    torch.set_num_threads(threads)
    dev = "cuda" if (jax.default_backend() == "gpu" and torch.cuda.is_available()) else "cpu"
    fp, fs, gp, gs, x, y = torch_inputs(state, batch_np, dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def autocast(fn):
        def run():
            with torch.autocast(device_type=dev, dtype=torch.bfloat16):
                return fn()
        return run

    # PyTorch's float32 on a GPU is its default: cuDNN convolutions in TF32, matmuls in float32
    torch_prec = ("tf32" if dev == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32")
    jobs = [
        ("theta1", "", lambda: tr.theta1_step(fp, fs, gp, gs, x, y, PSI)),
        ("theta1", "+ 2 diagnostic backward passes, as the reference runs it",
         lambda: tr.theta1_step(fp, fs, gp, gs, x, y, PSI, diagnostics=True,
                                original_cost=args.original_cost)),
        ("theta2", "", lambda: tr.theta2_step(fp, fs, gp, gs, x, y, PSI)),
    ]
    if args.original_cost:
        jobs.append(("theta2", "as the reference runs it (backward also into f)",
                     lambda: tr.theta2_step(fp, fs, gp, gs, x, y, PSI, original_cost=True)))
    if args.torch_autocast:
        jobs += [
            ("theta1", AUTOCAST, autocast(lambda: tr.theta1_step(fp, fs, gp, gs, x, y, PSI))),
            ("theta1", f"{AUTOCAST} + 2 diagnostic backward passes, as the reference runs it",
             autocast(lambda: tr.theta1_step(fp, fs, gp, gs, x, y, PSI, diagnostics=True,
                                             original_cost=args.original_cost))),
            ("theta2", AUTOCAST, autocast(lambda: tr.theta2_step(fp, fs, gp, gs, x, y, PSI))),
        ]
    rows = []
    for step, variant, fn in jobs:
        print(f"  PyTorch {step} {variant} ({threads} threads) ...", file=sys.stderr, flush=True)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with RssPeak() as mem:
            fn()
            sync()
        peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        amp = variant.startswith(AUTOCAST)
        extra = variant[len(AUTOCAST):] if amp else variant
        key = (("torch-autocast" if amp else "torch") + f"/{step}"
               + ("/reference" if extra.strip() else "") + f"@{threads}")
        rows.append(Row(model, "PyTorch", step, f"{variant or '-'}; {threads} threads", times,
                        rss_growth=mem.growth, device_peak=peak, batch=args.batch, key=key,
                        precision="bf16" if amp else torch_prec))
    return rows


AUTOCAST = "autocast bfloat16"


# --------------------------------------------------------------------------------------- report
def fastest_torch(rows: list, model: str, key: str):
    """The fastest PyTorch row of ``key`` (e.g. ``torch/theta2``) over the thread counts measured."""
    cands = [r for r in rows if r.model == model and r.key.split("@")[0] == key]
    return min(cands, key=lambda r: r.median) if cands else None


def print_step_table(rows: list, peaks: dict):
    by_key = {(r.model, r.key): r for r in rows}
    # useful FLOPs of a PyTorch row: the JAX step with the same math (first conv impl measured)
    for r in rows:
        if r.framework == "PyTorch" and r.flops is None:
            for k, jr in by_key.items():
                if k[0] == r.model and jr.framework == "JAX" and (
                        (r.step == "theta1" and jr.key.startswith("jax/theta1/")) or
                        (r.step == "theta2" and jr.key.startswith("jax/theta2/reverse/"))) \
                        and jr.flops:
                    r.flops = jr.flops
                    break
    print("| model | framework | step | variant | ms/step | images/s | PyTorch/JAX time | "
          "compile s | RSS growth (1st run) | XLA buffers | device peak mem | GFLOP/step | "
          "% of peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = "-"
        if r.framework == "JAX":
            ref = fastest_torch(rows, r.model, f"torch/{r.step}")
            if ref is not None:
                ratio = f"{ref.median / r.median:.2f}x"
        gflop = f"{r.flops / 1e9:.1f}" if r.flops else "-"
        frac = (f"{100 * r.flops / r.median / peaks[r.precision][0]:.1f}% ({r.precision})"
                if r.flops else "-")
        print(f"| {r.model} | {r.framework} | {r.step} | {r.variant} | {1e3 * r.median:.0f} | "
              f"{r.batch / r.median:.1f} | {ratio} | "
              f"{'-' if r.compile_s is None else f'{r.compile_s:.1f}'} | {fmt_bytes(r.rss_growth)} | "
              f"{fmt_bytes(r.xla_bytes)} | {fmt_bytes(r.device_peak)} | {gflop} | {frac} |")


def write_json(path: str, rows: list, peaks: dict) -> None:
    import json

    dev = jax.devices()[0]
    out = {"device": {"platform": dev.platform, "kind": dev.device_kind},
           "matmul_precision": jax.config.jax_default_matmul_precision,
           "peaks": {k: {"flops": v, "source": what} for k, (v, what) in peaks.items()},
           "rows": [{"model": r.model, "framework": r.framework, "step": r.step,
                     "variant": r.variant, "key": r.key, "precision": r.precision,
                     "median_s": r.median, "times_s": list(r.times), "batch": r.batch,
                     "flops": r.flops, "compile_s": r.compile_s, "device_peak": r.device_peak}
                    for r in rows]}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def print_profiles(rows: list, top: int = 12):
    for r in rows:
        if not r.profile:
            continue
        total, kinds = r.profile
        print(f"\nOp profile, {r.model} JAX {r.step} ({r.variant}), one call: {r.median * 1e3:.0f} ms "
              f"wall (median), {total:.0f} ms summed over XLA ops (concurrent ops add up)\n")
        print("| XLA op kind | ms | % of op time | count |\n| --- | --- | --- | --- |")
        for kind, ms, n in kinds[:top]:
            print(f"| {kind} | {ms:.0f} | {100 * ms / total:.1f}% | {n} |")
        rest = sum(ms for _, ms, _ in kinds[top:])
        print(f"| (other {max(len(kinds) - top, 0)} kinds) | {rest:.0f} | {100 * rest / total:.1f}% | - |")


def print_projection(rows: list, batch: int):
    steps_per_epoch = -(-TRAIN_EXAMPLES // batch)
    print(f"\nProjected wall time: one reference epoch = {steps_per_epoch} theta1 + {steps_per_epoch} "
          f"theta2 steps at batch {batch}; full run = {EPOCHS} epochs (data loading and evaluation "
          f"not included). Reference: ~{REFERENCE_HOURS:.0f} h for MAXL on a GTX 1080 (reported).\n")
    print("| model | implementation | theta1 s | theta2 s | epoch | 200 epochs | "
          "vs PyTorch as run by the reference | vs reference's 30 h (GTX 1080) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in dict.fromkeys(r.model for r in rows):
        by_key = {r.key: r for r in rows if r.model == model}
        for k in ("torch/theta1", "torch/theta1/reference", "torch/theta2", "torch/theta2/reference",
                  "torch-autocast/theta1", "torch-autocast/theta1/reference",
                  "torch-autocast/theta2"):
            best = fastest_torch(rows, model, k)  # PyTorch at its fastest thread count
            if best is not None:
                by_key[k] = best
        combos = []
        for k, r in by_key.items():
            if k.startswith("jax/theta2/"):
                _, _, form, impl = k.split("/")
                t1 = by_key.get(f"jax/theta1/{impl}")
                if t1:
                    combos.append((f"JAX, {form}, conv {impl}", t1.median, r.median))
        def threads(*keys):
            return "/".join(dict.fromkeys(by_key[k].key.split("@")[1] for k in keys))

        if "torch/theta1" in by_key and "torch/theta2" in by_key:
            combos.append((f"PyTorch, without the reference's extra work "
                           f"({threads('torch/theta1', 'torch/theta2')} threads)",
                           by_key["torch/theta1"].median, by_key["torch/theta2"].median))
        if "torch-autocast/theta1" in by_key and "torch-autocast/theta2" in by_key:
            combos.append((f"PyTorch autocast bfloat16, without the reference's extra work "
                           f"({threads('torch-autocast/theta1', 'torch-autocast/theta2')} threads)",
                           by_key["torch-autocast/theta1"].median,
                           by_key["torch-autocast/theta2"].median))
        ref = None
        if "torch/theta1/reference" in by_key:
            k2 = "torch/theta2/reference" if "torch/theta2/reference" in by_key else "torch/theta2"
            if k2 in by_key:
                ref = (by_key["torch/theta1/reference"].median, by_key[k2].median)
                combos.append((f"PyTorch, as the reference runs it "
                               f"({threads('torch/theta1/reference', k2)} threads)", *ref))
        for name, t1, t2 in combos:
            epoch = steps_per_epoch * (t1 + t2)
            vs = f"{steps_per_epoch * sum(ref) / epoch:.2f}x" if ref else "-"
            vs30 = f"{REFERENCE_HOURS * 3600 / (EPOCHS * epoch):.3f}x"
            print(f"| {model} | {name} | {t1:.3f} | {t2:.3f} | {fmt_duration(epoch)} | "
                  f"{fmt_duration(EPOCHS * epoch)} | {vs} | {vs30} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("vgg16", "small", "both"), default="both")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--conv-impl", default="auto",
                    help="comma-separated maxl_jax.conv implementations: auto, xla, patches, "
                         "shifted_matmul, hybrid (default auto)")
    ap.add_argument("--forms", default=",".join(FORMS), help="meta-gradient forms to time")
    ap.add_argument("--dtype", default="float32",
                    help=f"comma-separated compute dtypes of the JAX networks, each timed: "
                         f"{', '.join(DTYPES)} (default float32)")
    ap.add_argument("--matmul-precision", default=None,
                    help="jax_default_matmul_precision for this process (e.g. float32 / highest, "
                         "tensorfloat32 / high, bfloat16 / default)")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help="also write every row (median seconds, FLOPs, precision, key) and the "
                         "peaks as JSON (for benchmarks.campaign)")
    ap.add_argument("--torch-autocast", action="store_true",
                    help="also time the PyTorch steps under torch.autocast(bfloat16)")
    ap.add_argument("--torch", dest="torch", action="store_true", default=True,
                    help="also time the PyTorch reference port (default)")
    ap.add_argument("--notorch", "--no-torch", dest="torch", action="store_false")
    ap.add_argument("--torch-threads", default=str(num_cores()),
                    help="comma-separated torch.set_num_threads values, each timed (default: the "
                         "cores this process may use); ratios and projections use the fastest")
    ap.add_argument("--no-original-cost", dest="original_cost", action="store_false",
                    help="skip the PyTorch theta2 'as the reference runs it' row, and the "
                         "reference's discarded backward into g in the diagnostics row")
    ap.add_argument("--peak-matmul", type=int, default=4096,
                    help="size of the float32 matmul whose rate is the CPU's reference peak")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the device peak")
    ap.add_argument("--pool", choices=("library", "reduce_window"), default="library",
                    help="2x2 max-pool of the JAX networks: the library's (models.max_pool_2x2) or "
                         "flax's nn.max_pool (reduce_window; the form before the CPU fix), to A/B it")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="also trace one call of each JAX step with jax.profiler (into DIR) and "
                         "print the time per XLA op kind")
    args = ap.parse_args(argv)
    args.conv_impl = args.conv_impl.split(",")
    args.forms = args.forms.split(",")
    args.dtype = args.dtype.split(",")
    for d in args.dtype:
        if d not in DTYPES:
            ap.error(f"--dtype {d!r}: choose from {', '.join(DTYPES)}")
    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    args.torch_threads = [int(t) for t in str(args.torch_threads).split(",")]
    models_ = ("vgg16", "small") if args.model == "both" else (args.model,)
    if args.pool == "reduce_window":  # ConvBackbone looks the function up when it is traced
        from benchmarks.pool_layers import flax_max_pool_2x2
        models.max_pool_2x2 = flax_max_pool_2x2

    dev = jax.devices()[0]
    versions = f"jax {jax.__version__}, jaxlib {jax.lib.__version__}"
    if args.torch:
        import torch
        versions += f", torch {torch.__version__}"
    print(f"# MAXL step benchmark\n\ncommand: python -m benchmarks.steps {' '.join(argv or sys.argv[1:])}")
    print(f"machine: {cpu_model()}, {num_cores()} cores usable; python {platform.python_version()}; "
          f"{versions}")
    print(f"device: {dev.platform} ({dev.device_kind}); JAX default matmul precision: "
          f"{jax.config.jax_default_matmul_precision or 'default'}; float32 parameters, JAX "
          f"compute dtype(s): {', '.join(args.dtype)}; JAX max-pool: {args.pool}")
    print(f"batch {args.batch}, median of {args.repeats} after a warm-up; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    measured = {"fp32": measure_matmul_peak(args.peak_matmul, args.repeats)}
    if any(d != "float32" for d in args.dtype) or args.torch_autocast:
        measured["bf16"] = measure_matmul_peak(args.peak_matmul, args.repeats, jnp.bfloat16)
    peaks = device_peaks(args, measured)
    for k, (v, what) in peaks.items():
        print(f"peak FLOP rate for '% of peak' ({k}): {v / 1e9:.1f} GFLOP/s ({what})")
    print("measured " + ", ".join(f"{args.peak_matmul}^3 {k} matmul: {v / 1e9:.1f} GFLOP/s"
                                  for k, v in measured.items()) + "\n")

    rows = []
    batch_np = make_batch(args.batch)
    for model in models_:
        print(f"{model} ...", file=sys.stderr, flush=True)
        jrows, state = jax_rows(model, args, batch_np)
        rows += jrows
        if args.torch:
            for threads in args.torch_threads:
                rows += torch_rows(model, args, state, batch_np, threads)
        del state
    print_step_table(rows, peaks)
    if args.json:
        write_json(args.json, rows, peaks)
    print_projection(rows, args.batch)
    print_profiles(rows)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

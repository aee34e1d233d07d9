"""The GPU campaign in one command: device-sensitive tests, the VGG-16 step benchmark in every
precision against the PyTorch port, a one-epoch VGG-16 MAXL run on real Fashion-MNIST, and the
projections, each table written to ``benchmarks/results/``.

    python -m benchmarks.campaign [--small] [--out DIR] [--budget-minutes 25] [--dry-run]
                                  [--only env,steps,epoch,tests] [--data-dir DIR]

Steps (each a subprocess with its own timeout, its progress on stderr, its tables as markdown in
``--out``; the campaign itself never initialises JAX or CUDA, so the children get the whole GPU):

1. ``env``: Python, JAX, jaxlib, Flax, optax, orbax, PyTorch versions, the devices, ``nvidia-smi``,
   which optional packages are absent, and the peak FLOP/s table (``benchmarks.steps.GPU_PEAKS``:
   H100/H200/A100 in float32, TF32 and bfloat16) -> ``environment.md``.
2. ``steps``: ``benchmarks.steps`` on VGG-16 at batch 100, one process per precision: JAX float32
   (``--matmul-precision float32``: true float32), JAX TF32 (``tensorfloat32``) and JAX bfloat16
   (``--dtype bfloat16``); the first also times the PyTorch port in float32 (its defaults: cuDNN
   convolutions in TF32) and under ``torch.autocast(bfloat16)`` -> ``steps_<label>.md`` (the raw
   tables) and ``steps.md`` (every row; achieved FLOP/s from XLA's ``cost_analysis()`` against the
   peak of the precision each row computes in).
3. ``epoch``: one MAXL epoch of VGG-16 on the real Fashion-MNIST (60,000 training images: 600
   theta1 + 600 theta2 steps at batch 100, then the test set), through ``maxl_jax.train`` exactly as
   ``experiments.cifar`` runs it, in float32 (XLA's default matmul precision) and in bfloat16 ->
   ``epoch.md``. VGG-16 flattens after five 2x2 pools, so it needs 32x32 inputs: the 28x28 images are
   zero-padded by 2 pixels on each side (their background is 0). No TensorFlow Datasets needed: the
   four IDX archives are read from ``--data-dir`` (default ``$MAXL_SHARED_DATA/fashion_mnist`` or
   ``../shared/data/fashion_mnist``); without ``ml_collections`` the config is built with a minimal
   stand-in (attribute access, ``get``, ``to_dict``), said so in the output.
4. ``tests``: the device-sensitive test files (:data:`GPU_TESTS`: convolution forms, models, MAXL,
   parity with PyTorch, multi-device equality, precision) under pytest -> ``tests.md``. Last, so
   that a budget cut takes them (pytest runs them alone too) rather than the numbers.
5. ``summary.md``: the reference epoch (500 + 500 steps, CIFAR-100 at batch 100) and 200 epochs
   projected for each JAX precision against PyTorch as the reference runs it (its extra diagnostic
   and discarded backward passes) and against PyTorch's autocast, the one-epoch run's measured
   wall time scaled to CIFAR-100, and the three targets: one reference epoch at least 3x faster than
   the PyTorch reference as it runs, at least 40% of the GPU's peak for the precision used, and the
   200-epoch CIFAR-100 MAXL run under 15 minutes.

``--small`` runs the same steps with the small CNN, a few steps and a short test selection, so the
whole campaign runs end to end on a CPU in a few minutes (``benchmarks/results/campaign-cpu-small``).
``--budget-minutes`` bounds the whole: each step's timeout is cut to what is left, and a step that
would not fit is skipped and marked so. ``--only`` runs some steps (e.g. on a machine lent for 10
minutes at a time: ``--only env,steps`` then ``--only epoch`` into the same ``--out``; the summary
reads whatever results the folder holds). ``--dry-run`` prints the plan and runs nothing.

Expected on one H100/H200 (estimates, not yet measured): VGG-16 compiles in about a minute per
program, so each step-benchmark run takes 1.5-3 minutes, each epoch run 2-3, the tests 3-5. On a
machine whose commands are limited to 10 minutes, split it: ``--only env,steps --budget-minutes 9``,
then ``--only epoch,tests --budget-minutes 9`` into the same ``--out``. The Fashion-MNIST archives
must travel with the checkout there (e.g. copied into an ignored folder and given as
``--data-dir``); without them the epoch step fails with the data layer's message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Test files whose results depend on the device (numerics, compilation, devices).
GPU_TESTS = ("tests/test_precision.py", "tests/test_conv.py", "tests/test_models.py",
             "tests/test_maxl.py", "tests/test_torch_parity.py", "tests/test_parallel.py")
#: ``--small``: the precision tests that compile nothing heavy.
SMALL_TESTS = ("tests/test_precision.py",)
SMALL_TESTS_FILTER = "convolutions or scale_gradient or every_method"

#: In the order they run: the benchmarks before the tests, so a budget cut takes the tests (which
#: pytest also runs alone) rather than the numbers.
STEPS = ("env", "steps", "epoch", "tests")
CIFAR_TRAIN, FMNIST_TRAIN, BATCH, EPOCHS = 50_000, 60_000, 100, 200
TARGET_SPEEDUP, TARGET_PEAK, TARGET_MINUTES = 3.0, 0.40, 15.0


# ------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class Job:
    """One subprocess of a step: its label, command, timeout and where its stdout goes."""

    label: str
    command: list
    timeout_s: int
    stdout: str  # file name in --out


@dataclasses.dataclass
class Step:
    name: str
    title: str
    jobs: list


def steps_runs(small: bool) -> list[tuple[str, list[str]]]:
    """(label, extra ``benchmarks.steps`` flags) of the step benchmark's runs, one per precision."""
    if small:
        common = ["--model", "small", "--batch", "32", "--repeats", "2", "--forms", "reverse",
                  "--peak-matmul", "1024"]
    else:
        common = ["--model", "vgg16", "--batch", str(BATCH), "--repeats", "20", "--forms",
                  "reverse"]
    return [
        ("float32", common + ["--dtype", "float32", "--matmul-precision", "float32",
                              "--torch-autocast"]),
        ("bfloat16", common + ["--dtype", "bfloat16", "--notorch"]),
        ("tf32", common + ["--dtype", "float32", "--matmul-precision", "tensorfloat32",
                           "--notorch"]),
    ]


def epoch_runs(small: bool, data_dir: str) -> list[tuple[str, dict]]:
    """(label, spec) of the one-epoch MAXL runs."""
    base = {"data_dir": data_dir, "arch": "small" if small else "vgg16",
            "width": 8 if small else 0, "max_steps_per_epoch": 4 if small else 0}
    return [("bfloat16", {**base, "dtype": "bfloat16"}),
            ("float32", {**base, "dtype": "float32"})]


def plan(args) -> list[Step]:
    py = [sys.executable]
    out = []
    if "env" in args.only:
        out.append(Step("env", "Environment", [Job("env", py + ["-m", "benchmarks.campaign",
                                                                "--child-env"], 60,
                                                   "environment.md")]))
    if "steps" in args.only:
        jobs = []
        for label, flags in steps_runs(args.small):
            json_path = str(pathlib.Path(args.out) / f"steps_{label}.json")
            timeout = 300 if args.small or label == "float32" else 180  # float32 also runs torch
            jobs.append(Job(label, py + ["-m", "benchmarks.steps", *flags, "--json", json_path],
                            timeout, f"steps_{label}.md"))
        out.append(Step("steps", "Step benchmark", jobs))
    if "epoch" in args.only:
        jobs = []
        for label, spec in epoch_runs(args.small, args.data_dir):
            spec = {**spec, "json": str(pathlib.Path(args.out) / f"epoch_{label}.json")}
            jobs.append(Job(label, py + ["-m", "benchmarks.campaign", "--child-epoch",
                                         json.dumps(spec)], 300 if args.small else 240,
                            f"epoch_{label}.log"))
        out.append(Step("epoch", "One MAXL epoch on Fashion-MNIST", jobs))
    if "tests" in args.only:
        files = SMALL_TESTS if args.small else GPU_TESTS
        cmd = py + ["-m", "pytest", *files, "-q", "-rfE", "-p", "no:cacheprovider",
                    "--junitxml", str(pathlib.Path(args.out) / "tests.xml")]
        if args.small:
            cmd += ["-k", SMALL_TESTS_FILTER]
        out.append(Step("tests", "Device-sensitive tests",
                        [Job("tests", cmd, 300, "tests_output.txt")]))
    return out


# ------------------------------------------------------------------------------------- running
def run_job(job: Job, out_dir: pathlib.Path, timeout_s: float) -> tuple[str, float]:
    """Runs ``job`` with its stdout into ``out_dir / job.stdout`` (headed by the command) and its
    stderr through (progress). Returns ``(status, seconds)``; on timeout the job's whole process
    group is ended (SIGTERM, then SIGKILL after 10 s)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    path = out_dir / job.stdout
    shown = " ".join(c if c == sys.executable else (f"'{c}'" if " " in c or "{" in c else c)
                     for c in job.command).replace(sys.executable, "python")
    t = time.perf_counter()
    with open(path, "w") as f:
        f.write(f"<!-- command: {shown} -->\n")
        f.flush()
        proc = subprocess.Popen(job.command, cwd=ROOT, env=env, stdout=f, stderr=None,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = f"timed out after {timeout_s:.0f} s"
    return status, time.perf_counter() - t


def progress(msg: str) -> None:
    print(f"[campaign {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- children
def child_env() -> None:
    """Prints the environment as markdown (run as a child: it initialises JAX and CUDA)."""
    import importlib

    print("# Environment\n")
    print(f"- python {platform.python_version()} ({sys.executable}), {platform.platform()}")
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "torch",
                 "ml_collections", "tensorflow_datasets", "absl", "matplotlib"):
        try:
            mod = importlib.import_module(name)
            print(f"- {name} {getattr(mod, '__version__', '(version unknown)')}")
        except ImportError as e:
            note = {"ml_collections": " (the campaign builds its configs with a stand-in)",
                    "tensorflow_datasets": " (not needed: Fashion-MNIST is read from its IDX "
                                           "archives)"}.get(name, "")
            print(f"- {name}: absent ({type(e).__name__}){note}")
    import jax

    devs = jax.devices()
    print(f"- JAX backend {jax.default_backend()}: {len(devs)} device(s), "
          f"{', '.join(sorted({d.device_kind for d in devs}))}; default matmul precision "
          f"{jax.config.jax_default_matmul_precision or 'default'}")
    print(f"- XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    try:
        import torch

        cuda = torch.cuda.is_available()
        print(f"- torch CUDA available: {cuda}"
              + (f" ({torch.cuda.get_device_name(0)}, cuDNN {torch.backends.cudnn.version()}, "
                 f"cuDNN TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 "
                 f"{torch.backends.cuda.matmul.allow_tf32})" if cuda else ""))
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                            "clocks.max.sm,power.limit", "--format=csv"], capture_output=True,
                           text=True, timeout=30)
        print("\n```\n" + (q.stdout or q.stderr).strip() + "\n```")
    from benchmarks.steps import GPU_PEAKS

    print("\n## Peak FLOP/s (dense, spec sheets) used for '% of peak'\n")
    print("| GPU | float32 | TF32 | bfloat16 / float16 |\n| --- | --- | --- | --- |")
    for name, p in GPU_PEAKS.items():
        print(f"| {name} | {p['fp32'] / 1e12:.1f} T | {p['tf32'] / 1e12:.1f} T | "
              f"{p['bf16'] / 1e12:.1f} T |")
    kind = devs[0].device_kind
    match = next((n for n in GPU_PEAKS if n in kind), None)
    print(f"\nThis device ({kind}): " + (f"row {match!r}." if match else
                                         "not in the table: benchmarks.steps measures a large "
                                         "matmul in each precision instead."))


def _config_stand_in():
    """A minimal ``ml_collections`` stand-in (``ConfigDict``: attribute access, ``get``,
    ``to_dict``), enough for ``experiments/configs/default.py`` and ``maxl_jax.train``."""
    import types

    class ConfigDict(dict):
        def __init__(self, initial=None):
            super().__init__()
            for k, v in (initial or {}).items():
                self[k] = v

        def __setitem__(self, key, value):
            if isinstance(value, dict) and not isinstance(value, ConfigDict):
                value = ConfigDict(value)
            super().__setitem__(key, value)

        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError:
                raise AttributeError(key) from None

        def __setattr__(self, key, value):
            self[key] = value

        def to_dict(self):
            return {k: v.to_dict() if isinstance(v, ConfigDict) else v for k, v in self.items()}

    module = types.ModuleType("ml_collections")
    module.ConfigDict = ConfigDict
    return module


def pad_to_32(dataset):
    """The data set with its images zero-padded to 32x32 (Fashion-MNIST's 28x28 by 2 on each side)."""
    import numpy as np

    def pad(split):
        h, w = split.images.shape[1:3]
        ph, pw = (32 - h) // 2, (32 - w) // 2
        images = np.pad(split.images, ((0, 0), (ph, 32 - h - ph), (pw, 32 - w - pw), (0, 0)))
        return dataclasses.replace(split, images=images)

    train, test = pad(dataset.train), pad(dataset.test)
    return dataclasses.replace(dataset, train=train, test=test,
                               image_shape=tuple(int(d) for d in test.images.shape[1:]))


def child_epoch(spec: dict) -> None:
    """One MAXL epoch on Fashion-MNIST through ``maxl_jax.train`` (run as a child)."""
    try:
        import ml_collections  # noqa: F401
        stand_in = False
    except ImportError:
        sys.modules["ml_collections"] = _config_stand_in()
        stand_in = True
    from experiments.configs import default
    from maxl_jax import data as data_lib
    from maxl_jax import train

    print(f"# One MAXL epoch: {spec['arch']} on Fashion-MNIST, {spec['dtype']}\n")
    if stand_in:
        print("ml_collections is not installed: the config is built with the campaign's minimal "
              "ConfigDict stand-in.\n")
    c = default.get_config()
    c.dataset, c.data_dir, c.download = "fashion_mnist", spec["data_dir"], False
    c.primary_level = 0  # CIFAR-100 only
    c.arch, c.width, c.dtype = spec["arch"], spec["width"], spec["dtype"]
    c.epochs, c.last_k, c.augment = 1, 1, False
    c.max_steps_per_epoch = spec["max_steps_per_epoch"]
    if spec["arch"] == "vgg16":  # five 2x2 pools and a flatten: 32x32 inputs
        original = data_lib.load_dataset
        data_lib.load_dataset = lambda *a, **k: pad_to_32(original(*a, **k))
        print("Images zero-padded from 28x28 to 32x32 (VGG-16's five 2x2 pools).\n")
    workdir = tempfile.mkdtemp(prefix="maxl_campaign_epoch_")
    try:
        t = time.perf_counter()
        summary = train.train_and_evaluate(c, workdir, progress=False)
        wall = time.perf_counter() - t
        records = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rec = records[-1]
    import jax

    result = {"arch": spec["arch"], "dtype": spec["dtype"], "device": jax.devices()[0].device_kind,
              "matmul_precision": jax.config.jax_default_matmul_precision or "default",
              "wall_s": wall, "epoch_time_s": rec["epoch_time"],
              "train_images_per_sec": rec["train_images_per_sec"],
              "test_accuracy": summary["final_test_accuracy"],
              "steps_per_epoch": spec["max_steps_per_epoch"] or FMNIST_TRAIN // BATCH,
              "config_stand_in": stand_in}
    print(json.dumps(result, indent=1))
    with open(spec["json"], "w") as f:
        json.dump(result, f, indent=1)


# ------------------------------------------------------------------------------------- reports
def _load(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tests_table(out_dir: pathlib.Path) -> str:
    xml = out_dir / "tests.xml"
    if not xml.exists():
        return "No test results (tests.xml absent).\n"
    root = ET.parse(xml).getroot()
    per_file, failures = {}, []
    for case in root.iter("testcase"):
        f = (case.get("classname") or "?").replace(".", "/") + ".py"
        row = per_file.setdefault(f, {"passed": 0, "failed": 0, "skipped": 0, "time": 0.0})
        row["time"] += float(case.get("time") or 0)
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            row["failed"] += 1
            msg = (bad.get("message") or "").strip().splitlines()
            failures.append(f"- `{f}::{case.get('name')}`: {msg[0][:300] if msg else ''}")
        elif case.find("skipped") is not None:
            row["skipped"] += 1
        else:
            row["passed"] += 1
    lines = ["| test file | passed | failed | skipped | s |", "| --- | --- | --- | --- | --- |"]
    for f, r in per_file.items():
        lines.append(f"| {f} | {r['passed']} | {r['failed']} | {r['skipped']} | {r['time']:.0f} |")
    text = "\n".join(lines) + "\n"
    if failures:
        text += "\nFailures:\n\n" + "\n".join(failures) + "\n"
    return text


def step_rows(out_dir: pathlib.Path) -> list:
    """Every row of the step benchmark runs found in ``out_dir``, with its run's label and the peak
    FLOP/s of its precision (``peak``, ``peak_source``)."""
    rows = []
    for label, _ in steps_runs(False):
        data = _load(out_dir / f"steps_{label}.json")
        if not data:
            continue
        for r in data["rows"]:
            peak = data["peaks"].get(r["precision"], {})
            run = label if r["framework"] == "JAX" else "-"
            rows.append({**r, "run": run, "peak": peak.get("flops"),
                         "peak_source": peak.get("source", "")})
    # PyTorch rows: the FLOPs of the JAX step doing the same useful work
    useful = {}
    for r in rows:
        if r["framework"] == "JAX" and r["flops"]:
            useful.setdefault((r["model"], r["step"]), r["flops"])
    for r in rows:
        if not r["flops"]:
            r["flops"] = useful.get((r["model"], r["step"]))
    return rows


def steps_table(rows: list) -> str:
    lines = ["| model | framework | JAX run | step | variant | ms/step | GFLOP | TFLOP/s | "
             "% of peak (precision) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        f = r["flops"]
        rate = f / r["median_s"] if f else None
        gflop = f"{f / 1e9:.1f}" if f else "-"
        tflops = f"{rate / 1e12:.3f}" if rate else "-"
        frac = f"{100 * rate / r['peak']:.1f}% ({r['precision']})" if rate and r["peak"] else "-"
        lines.append(f"| {r['model']} | {r['framework']} | {r['run']} | {r['step']} | "
                     f"{r['variant']} | {1e3 * r['median_s']:.1f} | {gflop} | {tflops} | {frac} |")
    return "\n".join(lines) + "\n"


def _rate(flops_per_s: float) -> str:
    return (f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else
            f"{flops_per_s / 1e9:.1f} GFLOP/s")


def _median(rows, key):
    cands = [r["median_s"] for r in rows if r["key"].split("@")[0] == key]
    return min(cands) if cands else None


def summary(out_dir: pathlib.Path, small: bool) -> str:
    rows = step_rows(out_dir)
    batch = rows[0]["batch"] if rows else BATCH
    steps_per_epoch = -(-CIFAR_TRAIN // batch)
    text = ["# Campaign summary\n"]
    if small:
        text.append("**--small**: the small CNN (width 32) at batch 32 on the step benchmark, and "
                    "4 steps of a width-8 small CNN at batch 100 in the epoch run: the numbers "
                    "check that the campaign runs end to end; they measure nothing about VGG-16 "
                    "and the two sections are not comparable.\n")
    t1_ref, t2_ref = _median(rows, "torch/theta1/reference"), _median(rows, "torch/theta2/reference")
    t1_pt, t2_pt = _median(rows, "torch/theta1"), _median(rows, "torch/theta2")
    t1_amp, t2_amp = _median(rows, "torch-autocast/theta1"), _median(rows, "torch-autocast/theta2")
    ref_epoch = steps_per_epoch * (t1_ref + t2_ref) if t1_ref and t2_ref else None
    text.append(f"## Reference epoch and 200 epochs from the step benchmark\n\nOne reference epoch "
                f"= {steps_per_epoch} theta1 + {steps_per_epoch} theta2 steps (CIFAR-100, batch "
                f"{batch}); data loading and evaluation not included.\n")
    text.append("| implementation | theta1 ms | theta2 ms | epoch s | 200 epochs min | "
                "PyTorch as run / this |\n| --- | --- | --- | --- | --- | --- |")
    combos = []
    for run in ("float32", "tf32", "bfloat16"):
        t1 = next((r["median_s"] for r in rows if r["run"] == run and r["framework"] == "JAX"
                   and r["step"] == "theta1"), None)
        t2 = next((r["median_s"] for r in rows if r["run"] == run and r["framework"] == "JAX"
                   and r["step"] == "theta2"), None)
        if t1 and t2:
            combos.append((f"JAX {run}", t1, t2))
    if t1_pt and t2_pt:
        combos.append(("PyTorch float32, without the reference's extra work", t1_pt, t2_pt))
    if t1_amp and t2_amp:
        combos.append(("PyTorch autocast bfloat16, without the extra work", t1_amp, t2_amp))
    if t1_ref and t2_ref:
        combos.append(("PyTorch float32 as the reference runs it", t1_ref, t2_ref))
    best = {}
    for name, t1, t2 in combos:
        epoch = steps_per_epoch * (t1 + t2)
        ratio = f"{ref_epoch / epoch:.2f}x" if ref_epoch else "-"
        text.append(f"| {name} | {1e3 * t1:.1f} | {1e3 * t2:.1f} | {epoch:.1f} | "
                    f"{EPOCHS * epoch / 60:.1f} | {ratio} |")
        if name.startswith("JAX"):
            best[name] = epoch
    text.append("")
    # measured epochs
    epochs = {label: _load(out_dir / f"epoch_{label}.json") for label, _ in epoch_runs(small, "")}
    epochs = {k: v for k, v in epochs.items() if v}
    if epochs:
        text.append("## The measured MAXL epoch on Fashion-MNIST\n\n`epoch s`: the epoch's "
                    "training steps (theta1 and theta2 passes) as `maxl_jax.train` times them; "
                    "`wall s`: the whole process's run (data, compilation, evaluation, "
                    "checkpoint). Projected to CIFAR-100: epoch s x 500 / steps per epoch "
                    "(both at batch 100).\n")
        text.append("| dtype | device | steps/epoch | epoch s | wall s | test acc. | CIFAR-100 "
                    "epoch s (projected) | 200 epochs min | PyTorch as run / this |\n"
                    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, e in epochs.items():
            cifar = e["epoch_time_s"] * (CIFAR_TRAIN // BATCH) / e["steps_per_epoch"]
            ratio = f"{ref_epoch / cifar:.2f}x" if ref_epoch else "-"
            text.append(f"| {e['dtype']} (matmul {e['matmul_precision']}) | {e['device']} | "
                        f"{e['steps_per_epoch']} | {e['epoch_time_s']:.1f} | {e['wall_s']:.1f} | "
                        f"{e['test_accuracy']:.4f} | {cifar:.1f} | {EPOCHS * cifar / 60:.1f} | "
                        f"{ratio} |")
            best[f"measured epoch, {label}"] = cifar
        text.append("")
    # targets
    text.append("## Targets\n")
    if best and ref_epoch:
        name, epoch = min(best.items(), key=lambda kv: kv[1])
        speed = ref_epoch / epoch
        text.append(f"- One reference epoch >= {TARGET_SPEEDUP:.0f}x faster than PyTorch as the "
                    f"reference runs it: {speed:.2f}x ({name}) - "
                    f"{'met' if speed >= TARGET_SPEEDUP else 'NOT met'}")
    else:
        text.append("- Speed-up over PyTorch as run: no PyTorch or JAX rows to compare.")
    fr = [(r["flops"] / r["median_s"] / r["peak"], r) for r in rows
          if r["framework"] == "JAX" and r["flops"] and r["peak"]]
    if fr:
        f, r = max(fr, key=lambda x: x[0])
        text.append(f"- >= {100 * TARGET_PEAK:.0f}% of the peak for the precision used: best "
                    f"{100 * f:.1f}% ({r['run']} {r['step']}, {r['precision']} peak "
                    f"{_rate(r['peak'])}: {r['peak_source']}) - "
                    f"{'met' if f >= TARGET_PEAK else 'NOT met'}; every row in steps.md")
    if best:
        name, epoch = min(best.items(), key=lambda kv: kv[1])
        minutes = EPOCHS * epoch / 60
        text.append(f"- 200-epoch CIFAR-100 MAXL run under {TARGET_MINUTES:.0f} min: "
                    f"{minutes:.1f} min projected ({name}; training steps only) - "
                    f"{'met' if minutes < TARGET_MINUTES else 'NOT met'}")
    return "\n".join(text) + "\n"


def write_reports(out_dir: pathlib.Path, small: bool, log: list) -> None:
    rows = step_rows(out_dir)
    if rows:
        (out_dir / "steps.md").write_text(
            "# Step benchmark, every run\n\nAchieved FLOP/s: XLA's cost analysis of the JAX step "
            "(PyTorch rows: the JAX step with the same useful work) / the median time; % of the "
            "peak of the precision the row computes in (fp32, tf32 or bf16; see environment.md)."
            "\n\n" + steps_table(rows))
    if (out_dir / "tests.xml").exists():
        (out_dir / "tests.md").write_text("# Device-sensitive tests\n\n" + tests_table(out_dir))
    (out_dir / "summary.md").write_text(summary(out_dir, small))
    index = ["# Campaign\n", f"command: python -m benchmarks.campaign {' '.join(sys.argv[1:])}\n",
             "| step | job | status | s | output |", "| --- | --- | --- | --- | --- |"]
    index += log
    (out_dir / "README.md").write_text("\n".join(index) + "\n\nTables: summary.md, steps.md, "
                                       "tests.md, environment.md; raw outputs beside them.\n")


# ------------------------------------------------------------------------------------- main
def default_out(small: bool) -> str:
    name = "cpu"
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        if q.returncode == 0 and q.stdout.strip():
            name = q.stdout.strip().splitlines()[0].lower().replace("nvidia", "").strip()
            name = "-".join(name.split())
    return str(ROOT / "benchmarks" / "results" / f"campaign-{name}{'-small' if small else ''}")


def default_data_dir() -> str:
    env = os.environ.get("MAXL_SHARED_DATA")
    base = pathlib.Path(env) if env else ROOT.parent / "shared" / "data"
    return str(base / "fashion_mnist")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true",
                    help="the small CNN and a few steps: the whole campaign on a CPU in minutes")
    ap.add_argument("--out", default=None,
                    help="results folder (default benchmarks/results/campaign-<device>[-small])")
    ap.add_argument("--budget-minutes", type=float, default=25.0)
    ap.add_argument("--only", default=",".join(STEPS), help=f"steps to run, of {STEPS}")
    ap.add_argument("--data-dir", default=None,
                    help="folder of the four Fashion-MNIST IDX archives (default "
                         "$MAXL_SHARED_DATA/fashion_mnist or ../shared/data/fashion_mnist)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--child-env", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-epoch", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_env:
        return child_env()
    if args.child_epoch:
        return child_epoch(json.loads(args.child_epoch))
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in args.only:
        if s not in STEPS:
            ap.error(f"--only {s!r}: choose from {', '.join(STEPS)}")
    args.out = args.out or default_out(args.small)
    args.data_dir = str(pathlib.Path(args.data_dir or default_data_dir()).resolve())
    steps = plan(args)
    budget = 60 * args.budget_minutes
    if args.dry_run:
        print(f"Plan ({'small' if args.small else 'full'}; budget {args.budget_minutes:g} min; "
              f"results in {args.out}):")
        total = 0
        for i, step in enumerate(steps, 1):
            for job in step.jobs:
                total += job.timeout_s
                cmd = " ".join(job.command).replace(sys.executable, "python")
                print(f"  {i}. {step.name}/{job.label} (timeout {job.timeout_s} s) -> "
                      f"{job.stdout}: {cmd}")
        print(f"  then summary.md, steps.md, tests.md, README.md; timeouts add up to "
              f"{total / 60:.1f} min (each cut to the budget left)")
        return
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "epoch" in args.only and not (pathlib.Path(args.data_dir)
                                     / "train-images-idx3-ubyte.gz").exists():
        progress(f"no Fashion-MNIST IDX archives in {args.data_dir}: the epoch step will fail; "
                 f"give --data-dir or MAXL_SHARED_DATA")
    start = time.perf_counter()
    log = []
    n_jobs = sum(len(s.jobs) for s in steps)
    k = 0
    for step in steps:
        for job in step.jobs:
            k += 1
            left = budget - (time.perf_counter() - start)
            timeout = min(job.timeout_s, left)
            if timeout < 30:
                log.append(f"| {step.name} | {job.label} | skipped: {left:.0f} s of the budget left "
                           f"| - | - |")
                progress(f"({k}/{n_jobs}) {step.name}/{job.label}: skipped, budget spent")
                continue
            progress(f"({k}/{n_jobs}) {step.name}/{job.label}: started (timeout {timeout:.0f} s)")
            status, secs = run_job(job, out_dir, timeout)
            progress(f"({k}/{n_jobs}) {step.name}/{job.label}: {status} in {secs:.0f} s")
            log.append(f"| {step.name} | {job.label} | {status} | {secs:.0f} | {job.stdout} |")
            write_reports(out_dir, args.small, log)  # partial results survive a stop
    write_reports(out_dir, args.small, log)
    total = time.perf_counter() - start
    with open(out_dir / "README.md", "a") as f:
        f.write(f"\nWall time of the whole campaign: {total:.0f} s "
                f"(budget {args.budget_minutes:g} min).\n")
    progress(f"done in {total:.0f} s; tables in {out_dir}")
    print((out_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()

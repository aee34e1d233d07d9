"""What the persistent compilation cache saves: the same command-line run twice, in fresh processes,
with one fresh cache folder.

    python -m benchmarks.compile_cache [--method maxl] [--config experiments/configs/tiny.py]
        [--data-dir /path/to/fashion_mnist] [--epochs 1] [--steps 3] [--out FILE.md]

Run 1 starts with an empty cache (it compiles every step and writes it); run 2 is the same config in
a new workdir (the programs are the same, so it loads them). Per run: the CLI's own "Compiled the
steps in X s" figure, the cache entries written, and the process's wall time (imports, data
loading, the epochs and evaluation included). Without ``--data-dir`` the runs use TFDS mock data
(tests/mock_data_cli.py). Prints a markdown table, with the command on top.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> tuple[float, float | None, str]:
    """(wall seconds, the CLI's "Compiled the steps in" seconds or None, stderr+stdout)."""
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise SystemExit(f"run failed ({out.returncode}):\n{text[-3000:]}")
    found = re.search(r"Compiled the steps in ([0-9.]+) s", text)
    return wall, (float(found.group(1)) if found else None), text


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="maxl")
    p.add_argument("--config", default="experiments/configs/tiny.py")
    p.add_argument("--data-dir", default="")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="--config.max_steps_per_epoch")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="maxl_compile_cache_"))
    cache = tmp / "cache"
    entry = (["-m", "experiments.cifar"] if args.data_dir
             else [str(ROOT / "tests" / "mock_data_cli.py"), "--config.dataset=cifar100",
                   "--config.primary_level=20"])
    base = [sys.executable, *entry, f"--config={args.config}", f"--method={args.method}",
            f"--config.epochs={args.epochs}", f"--config.max_steps_per_epoch={args.steps}",
            "--noprogress", f"--compilation_cache={cache}"]
    if args.data_dir:
        base.append(f"--config.data_dir={args.data_dir}")
    rows, seen = [], set()
    for i, label in ((1, "1: empty cache"), (2, "2: same config, new process")):
        wall, compiled, _ = run([*base, f"--workdir={tmp / f'run{i}'}"])
        entries = {q.name for q in cache.iterdir()} if cache.is_dir() else set()
        rows.append((label, compiled, len(entries - seen), wall))
        seen |= entries
    command = "python -m benchmarks.compile_cache " + shlex.join(argv if argv is not None
                                                                   else sys.argv[1:])
    lines = [f"`{command.strip()}`", "",
             f"{args.method} on {args.config}, {args.epochs} epoch(s) of {args.steps} steps, "
             f"{'data ' + args.data_dir if args.data_dir else 'TFDS mock data'}; "
             f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
             f"jax {__import__('jax').__version__}, {__import__('jax').default_backend()}, "
             f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end "
             f"(the load of other work on the machine makes the times noisy; the entries "
             f"column is exact).", "",
             "| run | \"Compiled the steps in\" | cache entries written | wall time |",
             "|---|---|---|---|"]
    for label, compiled, written, wall in rows:
        c = "not printed" if compiled is None else f"{compiled:.1f} s"
        lines.append(f"| {label} | {c} | {written} | {wall:.1f} s |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()

"""The CPU benchmark scripts whose tables BENCHMARKS.md cites run end to end and print complete
tables, on tiny shapes (their numbers are measured by hand; these check the scripts, not speed),
and reject bad arguments with argparse's one-line error."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from benchmarks.conv_layers import vgg16_layers
from maxl_jax.conv import IMPLS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def table_rows(text):
    return [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")][1:]  # minus the header


def test_matmul_rates_times_the_square_and_every_vgg16_layer():
    out = run("benchmarks.matmul_rates", "--batch", "1", "--square", "64", "--repeats", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = table_rows(out.stdout)
    assert len(rows) == 1 + len(vgg16_layers())
    assert rows[0].startswith("| 64^3 square | 64 x 64 x 64 |")
    for row in rows:
        assert re.fullmatch(r"\| .+ \| \d+ x \d+ x \d+ \| \d+ \|", row), row


def test_ab_steps_prints_one_row_per_configuration_with_every_round():
    out = run("benchmarks.ab_steps", "--model", "small", "--impls", "patches,hybrid",
              "--batch", "2", "--rounds", "2", "--notorch")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = table_rows(out.stdout)
    assert [r.split(" | ")[0] for r in rows] == ["| JAX, conv patches", "| JAX, conv hybrid"]
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert float(cells[1]) > 0 and cells[3] == "-"  # no PyTorch, so no ratio
        assert len(cells[4].split(", ")) == 2  # one time per round


@pytest.mark.parametrize("module, args, message", [
    ("benchmarks.ab_steps", ["--impls", "patches,foo"], "unknown implementation 'foo'"),
    ("benchmarks.ab_steps", ["--rounds", "0"], "must be >= 1"),
    ("benchmarks.matmul_rates", ["--square", "-1"], "--square >= 0"),
])
def test_bad_arguments_are_one_line_errors(module, args, message):
    out = run(module, *args, timeout=120)
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr
    if "unknown implementation" in message:
        assert all(impl in out.stderr for impl in IMPLS)  # and it lists the choices


def test_accelerator_estimate_scales_with_the_protocols_steps_and_the_assumed_rate():
    """From the committed cost tables: the time is FLOPs over the rate (halving the rate doubles
    every hour figure), and CIFAR-10 at 5% runs a twentieth of CIFAR-100's steps per epoch."""
    from benchmarks import accelerator_estimate as est

    ratios = est.epoch_ratios(est.RESULTS / "protocol_cost_fmnist10_low.md")
    assert ratios["single"] == 1.0 and ratios["maxl_psi5"] > 2.0
    assert est.training_step_gflop(est.RESULTS / "steps_final.md") > 100
    out = run("benchmarks.accelerator_estimate", "--tflops", "20,40")
    assert out.returncode == 0, out.stderr
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")]
            for r in table_rows(out.stdout)}
    big, small = rows["cifar100_20_vgg16"], rows["cifar10_low_vgg16"]
    assert (int(big[2]), int(small[2])) == (500, 25)
    for row in (big, small):
        assert abs(float(row[5].replace(",", "")) - 2 * float(row[6].replace(",", ""))) < 0.16

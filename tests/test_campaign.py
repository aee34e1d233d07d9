"""The GPU campaign (``python -m benchmarks.campaign``) is ready before a GPU is: its plan, its
arithmetic, and the pieces that let it run where TensorFlow Datasets and ml_collections are absent.
Nothing heavy runs here (``--small`` end to end is run by hand; its output is committed under
``benchmarks/results/campaign-cpu-small``)."""

import argparse
import json
import os
import pathlib
import runpy
import subprocess
import sys

import numpy as np

from benchmarks import campaign

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_small_dry_run_prints_every_step_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "benchmarks.campaign", "--small", "--dry-run",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    for job in ("env/env", "tests/tests", "steps/float32", "steps/tf32", "steps/bfloat16",
                "epoch/float32", "epoch/bfloat16"):
        assert job in run.stdout, job
    assert "--model small" in run.stdout and "vgg16" not in run.stdout
    assert not out.exists()


def test_the_full_plan_runs_vgg16_in_every_precision_against_pytorch_within_25_minutes(tmp_path):
    args = argparse.Namespace(small=False, only=list(campaign.STEPS), out=str(tmp_path),
                              data_dir="/data/fashion_mnist")
    steps = {s.name: s for s in campaign.plan(args)}
    assert list(steps) == list(campaign.STEPS)
    runs = {j.label: " ".join(j.command) for j in steps["steps"].jobs}
    assert set(runs) == {"float32", "tf32", "bfloat16"}
    assert all("--model vgg16" in c and "--batch 100" in c for c in runs.values())
    assert "--matmul-precision float32" in runs["float32"] and "--torch-autocast" in runs["float32"]
    assert "--matmul-precision tensorfloat32" in runs["tf32"] and "--notorch" in runs["tf32"]
    assert "--dtype bfloat16" in runs["bfloat16"]
    specs = [json.loads(j.command[-1]) for j in steps["epoch"].jobs]
    assert {s["dtype"] for s in specs} == {"float32", "bfloat16"}
    assert all(s["arch"] == "vgg16" and s["max_steps_per_epoch"] == 0 for s in specs)
    assert " ".join(steps["tests"].jobs[0].command).count("tests/test_") == len(campaign.GPU_TESTS)
    total = sum(j.timeout_s for s in steps.values() for j in s.jobs)
    assert total <= 25 * 60, total


def _steps_json(path, rows, peaks):
    path.write_text(json.dumps({"device": {"platform": "gpu", "kind": "NVIDIA H100"},
                                "matmul_precision": None, "peaks": peaks, "rows": rows}))


def test_the_summary_projects_epochs_and_checks_the_targets(tmp_path):
    peaks = {"fp32": {"flops": 67e12, "source": "s"}, "tf32": {"flops": 494.7e12, "source": "s"},
             "bf16": {"flops": 989.4e12, "source": "s"}}

    def row(framework, step, key, secs, precision, flops=None):
        return {"model": "vgg16", "framework": framework, "step": step, "variant": "v",
                "key": key, "precision": precision, "median_s": secs, "times_s": [secs],
                "batch": 100, "flops": flops, "compile_s": None, "device_peak": None}

    _steps_json(tmp_path / "steps_float32.json", [
        row("JAX", "theta1", "jax/theta1/auto", 0.020, "fp32", 1e12),
        row("JAX", "theta2", "jax/theta2/reverse/auto", 0.040, "fp32", 4e12),
        row("PyTorch", "theta1", "torch/theta1@16", 0.030, "tf32"),
        row("PyTorch", "theta1", "torch/theta1/reference@16", 0.080, "tf32"),
        row("PyTorch", "theta2", "torch/theta2@16", 0.100, "tf32"),
        row("PyTorch", "theta2", "torch/theta2/reference@16", 0.120, "tf32"),
    ], peaks)
    _steps_json(tmp_path / "steps_bfloat16.json", [
        row("JAX", "theta1", "jax/theta1/auto bfloat16", 0.004, "bf16", 1e12),
        row("JAX", "theta2", "jax/theta2/reverse/auto bfloat16", 0.010, "bf16", 4e12),
    ], peaks)
    (tmp_path / "epoch_bfloat16.json").write_text(json.dumps({
        "arch": "vgg16", "dtype": "bfloat16", "device": "H100", "matmul_precision": "default",
        "wall_s": 90.0, "epoch_time_s": 12.0, "train_images_per_sec": 5000.0,
        "test_accuracy": 0.8, "steps_per_epoch": 600, "config_stand_in": True}))
    text = campaign.summary(tmp_path, small=False)
    # PyTorch as run: 500 x (0.08 + 0.12) = 100 s an epoch; JAX bf16: 500 x 0.014 = 7 s: 14.29x
    assert "| JAX bfloat16 | 4.0 | 10.0 | 7.0 | 23.3 | 14.29x |" in text
    assert "| PyTorch float32 as the reference runs it | 80.0 | 120.0 | 100.0 | 333.3 | 1.00x |" in text
    # the measured epoch: 12 s for 600 steps -> 10 s for CIFAR-100's 500: 33.3 min for 200
    assert "| 600 | 12.0 | 90.0 | 0.8000 | 10.0 | 33.3 | 10.00x |" in text
    assert "14.29x (JAX bfloat16) - met" in text
    # best fraction of peak: JAX float32 theta2, 4e12 / 0.04 s = 100 TFLOP/s of 67: 149%
    assert "best 149.3% (float32 theta2, fp32 peak 67.0 TFLOP/s" in text
    assert "23.3 min projected (JAX bfloat16; training steps only) - NOT met" in text
    table = campaign.steps_table(campaign.step_rows(tmp_path))
    # a PyTorch row's FLOPs are those of the JAX step doing the same work: 4e12 / 0.1 s = 40 TFLOP/s
    assert "| vgg16 | PyTorch | - | theta2 | v | 100.0 | 4000.0 | 40.000 | 8.1% (tf32) |" in table


def test_without_ml_collections_the_stand_in_builds_the_default_config(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_collections", campaign._config_stand_in())
    c = runpy.run_path(str(ROOT / "experiments" / "configs" / "default.py"))["get_config"]()
    c.dtype = "bfloat16"
    assert c.get("dtype") == "bfloat16" and c["arch"] == c.arch == "vgg16"
    assert c.entropy_weight == 0.2 and c.olaux.every == 5 and "olaux" in c
    assert json.loads(json.dumps(dict(c)))["olaux"]["every"] == 5
    assert c.to_dict()["olaux"] == dict(c.olaux) and type(c.to_dict()["olaux"]) is dict
    assert not hasattr(c, "to_json")  # train.summarize then records dict(config)


def test_fashion_mnist_is_padded_to_32x32_for_vgg16():
    from maxl_jax import data as data_lib

    rng = np.random.default_rng(0)
    split = data_lib.Split(images=rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8),
                           primary=np.zeros(3, np.int32), human_aux=None)
    ds = data_lib.Dataset(name="fashion_mnist", train=split, test=split, num_primary=10,
                          psi_human=None, primary_names=tuple(map(str, range(10))),
                          image_shape=(28, 28, 1))
    padded = campaign.pad_to_32(ds)
    assert padded.image_shape == (32, 32, 1) and padded.train.images.shape == (3, 32, 32, 1)
    np.testing.assert_array_equal(padded.test.images[:, 2:30, 2:30], split.images)
    assert padded.train.images.sum() == split.images.sum()  # the border is zeros

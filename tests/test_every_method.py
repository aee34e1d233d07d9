"""Every registered method through the command line, end to end (tiny config, TFDS mock data):

* ``python -m experiments.cifar --xla --method=NAME`` trains and writes its outputs;
* a run stopped after its first epoch and resumed ends with bit-identical parameters and the same
  ``metrics.jsonl`` (timings aside) as the uninterrupted command-line run;
* the main job on 2 and 8 devices (XLA's fake CPU devices) ends with the 1-device numbers, up to
  float rounding.

Command-line runs are subprocesses (``tests/mock_data_cli.py``); all runs share the session's
persistent XLA compilation cache, so each program compiles once.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import tiny
from maxl_jax import methods, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mock_data_cli import NUM_EXAMPLES  # noqa: E402
from run_outputs import final_state, records  # noqa: E402


@pytest.fixture(scope="session")
def compilation_cache():
    return os.environ["JAX_COMPILATION_CACHE_DIR"]  # the session's (tests/conftest.py)


def cli(workdir, method, cache, *flags, devices=1, examples=NUM_EXAMPLES):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "MAXL_MOCK_EXAMPLES": str(examples),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    if devices > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + f" --xla_force_host_platform_device_count={devices}")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "mock_data_cli.py"),
         "--config=experiments/configs/tiny.py", "--config.dataset=cifar100",
         "--config.primary_level=20", f"--method={method}", f"--workdir={workdir}",
         "--noprogress", *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def run_in_process(workdir, method, **overrides):
    """The same run as ``cli``, through the library in this process (the compiled programs come
    from the session's cache)."""
    config = tiny.get_config()
    config.dataset, config.primary_level, config.method = "cifar100", 20, method
    for k, v in overrides.items():
        setattr(config, k, v)
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        return train.train_and_evaluate(config, workdir, progress=False, log=lambda s: None)


@pytest.mark.parametrize("method", methods.names())
def test_every_method_runs_from_the_command_line_and_resumes_exactly(method, tmp_path,
                                                                    compilation_cache):
    whole, split = tmp_path / "whole", tmp_path / "split"
    out = cli(whole, method, compilation_cache)
    assert "epoch    2/2" in out.stdout and "final test accuracy" in out.stdout
    assert (whole / "summary.json").exists() and (whole / "learning_curves.png").exists()
    assert all(("meta" in r) == methods.get(method).schedule.has_meta for r in records(whole))

    run_in_process(split, method, epochs=1)
    summary = run_in_process(split, method)  # resumes at the start of epoch 2
    a, b = final_state(whole), final_state(split)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert records(whole) == records(split)
    assert summary["best_epoch"] == json.loads((whole / "summary.json").read_text())["best_epoch"]


@pytest.mark.parametrize("method, devices, batch, steps_per_call", [
    # the reference's batch, which 8 devices do not divide (padded and masked), 3 steps a call
    ("maxl", 8, 100, 3),
    # a held-out split and a meta step after every training step, on 2 devices, 3 steps a call
    ("auxilearn", 2, 16, 3),
])
def test_the_main_job_on_several_devices_ends_with_the_1_device_numbers(
        method, devices, batch, steps_per_call, tmp_path, compilation_cache):
    """The whole loop (data placement, the compiled steps, evaluation in one call, checkpoints) on
    fake CPU devices, against one device taking one step per call. Every method's steps are
    compared on 1 and 8 devices in test_parallel.py."""
    one, many = tmp_path / "one", tmp_path / "many"
    flags = (f"--config.batch_size={batch}",)
    examples = 256 if batch > 32 else NUM_EXAMPLES
    cli(one, method, compilation_cache, *flags, examples=examples)
    out = cli(many, method, compilation_cache, *flags, f"--config.steps_per_call={steps_per_call}",
              devices=devices, examples=examples)
    if batch % devices:
        assert f"each step's batch is padded to {-(-batch // devices) * devices}" in out.stdout
    a, c = final_state(one), final_state(many)
    for key in a:
        if key.startswith(".sums") or not np.issubdtype(a[key].dtype, np.floating):
            continue
        np.testing.assert_allclose(c[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for x, y in zip(records(one), records(many)):
        np.testing.assert_allclose(y["test"]["loss"], x["test"]["loss"], rtol=1e-4)
        np.testing.assert_allclose(y["train"]["primary_loss"], x["train"]["primary_loss"],
                                   rtol=1e-4)


def test_maxl_reference_first_order_trains_through_the_loop_and_says_so(tmp_path):
    """``--config.meta_form=reference_first_order`` runs MAXL's meta passes with the reference's
    first-order step: finite losses, a generator that moves, and a summary naming the mode."""
    summary = run_in_process(tmp_path / "w", "maxl", epochs=1, meta_form="reference_first_order")
    assert summary["mode"]["meta_form"].startswith("reference_first_order")
    (record,) = records(tmp_path / "w")
    assert np.isfinite(record["meta"]["meta_loss"]) and record["meta"]["grad_norm"] > 0

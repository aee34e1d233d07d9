"""Every registered method through the command line, end to end (tiny config, TFDS mock data):

* ``python -m experiments.cifar --xla --method=NAME`` trains and writes its outputs;
* a run stopped after its first epoch and resumed ends with bit-identical parameters and the same
  ``metrics.jsonl`` (timings aside) as an uninterrupted run;
* the same run on 8 devices (XLA's fake CPU devices) ends with the same parameters and numbers, up
  to float rounding.

Each run is a subprocess (``tests/mock_data_cli.py``); they share a persistent XLA compilation cache,
so each program compiles once per test session.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxl_jax import methods
from maxl_jax.checkpoint import read_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMINGS = ("epoch_time", "train_images_per_sec")


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def cli(workdir, method, cache, *flags, devices=1):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
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


def final_state(workdir) -> dict:
    """The newest checkpoint's train state as a flat ``{path: array}``."""
    tree = read_state(pathlib.Path(workdir) / "checkpoints")
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def records(workdir) -> list[dict]:
    out = []
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if k not in TIMINGS})
    return out


@pytest.mark.parametrize("method", methods.names())
def test_every_method_runs_from_the_command_line_resumes_exactly_and_matches_on_8_devices(
        method, tmp_path, compilation_cache):
    whole, split, eight = tmp_path / "whole", tmp_path / "split", tmp_path / "eight"
    out = cli(whole, method, compilation_cache)
    assert "epoch    2/2" in out.stdout and "final test accuracy" in out.stdout
    assert (whole / "summary.json").exists() and (whole / "learning_curves.png").exists()

    cli(split, method, compilation_cache, "--config.epochs=1")
    cli(split, method, compilation_cache)  # resumes at the start of epoch 2
    a, b = final_state(whole), final_state(split)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert records(whole) == records(split)
    assert all(("meta" in r) == methods.get(method).schedule.has_meta for r in records(whole))

    cli(eight, method, compilation_cache, devices=8)
    c = final_state(eight)
    for key in a:
        if key.startswith(".sums") or not np.issubdtype(a[key].dtype, np.floating):
            continue
        np.testing.assert_allclose(c[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
    ra, rc = records(whole), records(eight)
    for x, y in zip(ra, rc):
        np.testing.assert_allclose(y["test"]["loss"], x["test"]["loss"], rtol=1e-4)
        np.testing.assert_allclose(y["train"]["primary_loss"], x["train"]["primary_loss"],
                                   rtol=1e-4)

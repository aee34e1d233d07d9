"""Reading a finished run's outputs in tests: its newest checkpoint and its metrics without timings.

Imported by the tests that run ``experiments.cifar`` or ``train.train_and_evaluate`` into a workdir
and compare runs (``tests/`` is put on ``sys.path`` by those modules, as for ``mock_data_cli``).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from maxl_jax.checkpoint import read_state

# the per-epoch metrics that measure time, which differ between otherwise identical runs
TIMINGS = ("epoch_time", "train_images_per_sec", "epoch_time_partial")


def final_state(workdir) -> dict:
    """The newest checkpoint's train state as a flat ``{path: array}``."""
    tree = read_state(pathlib.Path(workdir) / "checkpoints")
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def records(workdir) -> list[dict]:
    """The run's ``metrics.jsonl`` records, without the :data:`TIMINGS` fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]

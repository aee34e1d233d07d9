"""The README's library example runs as written, and its commands match what CI runs."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_example_runs_and_updates_the_generator():
    readme = (ROOT / "README.md").read_text()
    (block,) = python_blocks(readme)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert np.isfinite(float(namespace["meta_loss"]))
    assert set(namespace["g_vars"]) == {"params", "batch_stats"}


def test_ci_runs_the_readme_setup_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in readme and '-e ".[test]"' in ci
    assert "python -m pytest\n" in readme and ci.rstrip().endswith("python -m pytest")

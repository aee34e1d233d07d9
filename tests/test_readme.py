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


def test_ci_runs_the_readme_setup_and_test_commands_on_three_pinned_stacks():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in readme and "python -m pytest\n" in readme
    assert 'pip install -q -e ".[test]" -c "constraints/$name.txt"' in ci
    assert "&& python -m pytest)" in ci
    stacks = dict(re.findall(r"^stack (\w+) (3\.\d+)", ci, flags=re.M))
    assert stacks == {"default": "3.11", "colab": "3.12", "newest": "3.13"}
    for name in stacks:
        pins = (ROOT / "constraints" / f"{name}.txt").read_text()
        assert re.search(r"^jax==", pins, flags=re.M) and re.search(r"^flax==", pins, flags=re.M)
    colab = (ROOT / "constraints" / "colab.txt").read_text()
    for pin in ("jax==0.7.2", "flax==0.11.2", "optax==0.2.8", "orbax-checkpoint==0.12.4",
                "chex==0.1.90", "numpy==2.1.3", "tensorflow-datasets==4.9.10"):
        assert pin in colab


def test_version_bounds_admit_every_stack_and_never_cap_jax():
    setup = (ROOT / "setup.cfg").read_text()
    (jax_req,) = re.findall(r"^\s+(jax[<>=!~].*)$", setup, flags=re.M)
    assert "<" not in jax_req, jax_req  # pip must never replace a newer jax the user installed
    from packaging.specifiers import SpecifierSet
    spec = SpecifierSet(jax_req[len("jax"):])
    for name in ("colab", "default", "newest"):
        pins = (ROOT / "constraints" / f"{name}.txt").read_text()
        (version,) = re.findall(r"^jax==(\S+)", pins, flags=re.M)
        assert version in spec, (name, version)

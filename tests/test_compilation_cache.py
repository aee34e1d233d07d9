"""The command line's persistent compilation cache (maxl_jax.compilation_cache): a second process
running the same programs compiles nothing. Checked by counting, not timing: JAX's monitoring
events (``/jax/compilation_cache/cache_hits`` and ``cache_misses``, the latter recorded when a
freshly compiled program is written) and the entries in the cache folder."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from maxl_jax import compilation_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A tiny jitted function in a fresh process, through maxl_jax.compilation_cache.enable: prints the
# cache events it saw. It compiles in milliseconds, so JAX's default threshold (1 s) would not cache
# it: the first process writing an entry shows enable()'s settings are in force.
_PROGRAM = """
import collections, json, sys
import jax, jax.numpy as jnp
from maxl_jax import compilation_cache
events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kw: events.update([name]))
assert compilation_cache.enable(sys.argv[1]) == sys.argv[1]
print(float(jax.jit(lambda x: (jnp.sin(x) * 2 + 1).sum())(jnp.arange(8.0))))
print(json.dumps({k.rsplit("/", 1)[-1]: v for k, v in events.items()
                  if k.startswith("/jax/compilation_cache/")}))
"""


def _entries(cache: pathlib.Path) -> set:
    return {p.name for p in cache.iterdir()} if cache.is_dir() else set()


def _run_program(cache):
    out = subprocess.run([sys.executable, "-c", _PROGRAM, str(cache)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    value, events = out.stdout.strip().splitlines()[-2:]
    return float(value), json.loads(events)


def test_a_second_process_loads_the_compiled_program_and_compiles_nothing(tmp_path):
    cache = tmp_path / "cache"
    value, first = _run_program(cache)
    written = _entries(cache)
    assert first.get("cache_misses", 0) >= 1 and first.get("cache_hits", 0) == 0, first
    assert written, "the first process wrote no cache entry"
    again, second = _run_program(cache)
    assert again == value
    assert second.get("cache_hits", 0) >= 1, second
    assert second.get("cache_misses", 0) == 0, f"the second process compiled: {second}"
    assert _entries(cache) == written, "the second process wrote new entries"


def test_an_unwritable_folder_warns_once_and_leaves_the_cache_off(tmp_path):
    import jax

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    before = jax.config.jax_compilation_cache_dir
    warnings = []
    assert compilation_cache.enable(str(blocker / "cache"), warn=warnings.append) is None
    assert len(warnings) == 1 and str(blocker / "cache") in warnings[0]
    assert jax.config.jax_compilation_cache_dir == before  # untouched: JAX never sees the folder


def test_the_folder_the_command_line_chooses(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compilation_cache.resolve(None) == str(tmp_path / "env")
    assert compilation_cache.resolve(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert compilation_cache.resolve("none") is None
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.resolve(None) == str(tmp_path / "xdg" / "maxl_jax" / "jax_cache")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compilation_cache.resolve(None) == os.path.expanduser("~/.cache/maxl_jax/jax_cache")


def _cli(workdir, *flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "mock_data_cli.py"),
         "--config=experiments/configs/tiny.py", "--config.dataset=cifar100",
         "--config.primary_level=20", "--config.epochs=1", "--method=single",
         f"--workdir={workdir}", "--noprogress", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow  # four tiny command-line runs: about 45 s on two cores
def test_a_rerun_or_resume_of_the_command_line_writes_no_new_cache_entry(tmp_path):
    cache = tmp_path / "cache"
    _cli(tmp_path / "first", f"--compilation_cache={cache}")
    written = _entries(cache)
    assert written, "the command line wrote no cache entry"
    _cli(tmp_path / "second", f"--compilation_cache={cache}")
    assert _entries(cache) == written, "the rerun compiled (and wrote) programs again"
    out = _cli(tmp_path / "first", f"--compilation_cache={cache}", "--config.epochs=2")
    assert "Resumed from" in out.stdout + out.stderr
    assert _entries(cache) == written, "the resume compiled (and wrote) programs again"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = _cli(tmp_path / "third", f"--compilation_cache={blocker / 'cache'}")
    assert out.stderr.count("cannot be written") == 1, out.stderr[-2000:]

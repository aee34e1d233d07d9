"""The first run explains itself: ``python -m experiments.cifar`` from any directory, user errors as
one paragraph with exit status 2 (the traceback on request), no empty workdir after a failed start,
and a finished run that says so and changes nothing."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def entry_point(*flags, cwd, env=None, mock=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAXL_DATA_MIRROR": "http://127.0.0.1:9",
           **(env or {})}
    command = ([sys.executable, str(ROOT / "tests" / "mock_data_cli.py")] if mock else
               [sys.executable, "-m", "experiments.cifar"])
    return subprocess.run([*command, "--noprogress", *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_missing_data_without_network_is_one_message_from_any_directory(tmp_path):
    """The default config (found from another directory) on an empty data dir, no network."""
    out = entry_point(f"--config.data_dir={tmp_path / 'data'}", f"--workdir={tmp_path / 'run'}",
                      cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "Dataset 'cifar100' not found in" in out.stderr
    assert "cifar-100-binary.tar.gz" in out.stderr and "tfds build cifar100" in out.stderr
    assert not (tmp_path / "run").exists()  # a failed start leaves no workdir


def test_a_user_error_is_one_paragraph_and_the_traceback_comes_on_request(tmp_path):
    flags = ("--config=experiments/configs/tiny.py", "--config.dataset=cifar100",
             "--config.primary_level=20", "--config.psi=(5,5)", f"--workdir={tmp_path / 'w'}")
    out = entry_point(*flags, cwd=ROOT, mock=True)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "psi has 2 entries but the primary task has 20 classes" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 3
    out = entry_point(*flags, "--traceback", cwd=ROOT, mock=True)
    assert "Traceback" in out.stderr
    out = entry_point(*flags, cwd=ROOT, mock=True, env={"MAXL_TRACEBACK": "1"})
    assert "Traceback" in out.stderr
    assert not (tmp_path / "w").exists()


def test_re_running_a_finished_run_says_so_and_changes_nothing(tmp_path):
    flags = ("--config=experiments/configs/tiny.py", "--config.dataset=cifar100",
             "--config.primary_level=20", "--method=single", f"--workdir={tmp_path}")
    assert entry_point(*flags, cwd=ROOT, mock=True).returncode == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")
              if p.is_file()}
    out = entry_point(*flags, cwd=ROOT, mock=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "is complete (2 of 2 epochs done): nothing to train" in out.stdout
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")
             if p.is_file()}
    assert after == before


def test_flag_and_config_mistakes_are_one_paragraph_with_exit_2(tmp_path):
    """A misspelled config field (with the suggestion), a misspelled method field, a config file
    that does not exist, an unknown flag and a stray argument: each one paragraph, exit 2, nothing
    trained and no workdir made."""
    cases = {
        ("--config=experiments/configs/tiny.py", "--config.epoch=3"):
            '--config.epoch: the config has no field \'epoch\'. Did you mean "epochs"',
        ("--config=experiments/configs/tiny.py", "--config.wamal.no_such=1"):
            "--config.wamal.no_such: the config has no field 'no_such'",
        ("--config=experiments/configs/nope.py",):
            "--config=experiments/configs/nope.py: the config file does not load",
        ("--nosuchflag",): "Unknown command line flag 'nosuchflag'",
        ("stray",): "unexpected arguments ['stray']",
    }
    for flags, message in cases.items():
        out = entry_point(*flags, f"--workdir={tmp_path / 'w'}", cwd=ROOT)
        assert out.returncode == 2, (flags, out.stderr[-2000:])
        assert message in out.stderr and "Traceback" not in out.stderr, (flags, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, (flags, out.stderr)
    assert not (tmp_path / "w").exists()


def test_ctrl_c_while_the_libraries_import_is_the_documented_line_not_a_traceback(tmp_path):
    """A SIGINT that lands before JAX and the rest have imported (the fault hook sends it right
    after the entry point's first lines) ends with the one line the CLI prints for an interrupt
    before training, exit 130, and nothing written."""
    out = entry_point(f"--workdir={tmp_path / 'w'}", cwd=ROOT,
                      env={"MAXL_FAULT": "startup:0=INT"})
    assert out.returncode == 130, out.stderr[-2000:]
    assert "Interrupted before training started: nothing was saved." in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()

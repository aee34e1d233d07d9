"""Nothing lost, nothing silently wrong: every fault and bad input of docs/RELIABILITY.md.

* A run killed (SIGKILL) at seeded moments, among them right after a checkpoint at an epoch's last
  step, during evaluation and right after an epoch's record, and restarted until done, ends with the
  same parameters, ``metrics.jsonl`` and ``summary.json`` (timings aside) as an uninterrupted run.
  SIGINT and SIGTERM likewise, exiting 130 / 143 with one message and no traceback.
* A checkpoint with one flipped bit, or a truncated file, is refused and left byte-identical; the
  message names the newest intact checkpoint and how to resume from it, and resuming from it (by
  the flag) ends where an uninterrupted run does.
* A non-finite step is never saved; a failing save stops the run with a clear message at once.
* Bad settings are refused before anything is written; a changed trajectory setting on resume is
  refused; two processes cannot share a workdir; a torn or missing ``metrics.jsonl`` is handled.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import tiny
from maxl_jax import config_checks, train, validation
from maxl_jax.checkpoint import (CheckpointError, CheckpointWriteError, DamagedCheckpointError,
                                 read_state)

# Its module-scoped fixtures are computed once: its tests run in one worker under pytest-xdist.
pytestmark = pytest.mark.xdist_group("test_reliability")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from run_outputs import final_state, records  # noqa: E402

SUMMARY_TIMINGS = ("train_time_s", "train_images_per_sec", "train_time_complete")


@pytest.fixture(scope="module")
def cache():
    return os.environ["JAX_COMPILATION_CACHE_DIR"]  # the session's (tests/conftest.py)


def cli(workdir, cache, *flags, fault=None, timeout=600):
    """The command line on mock data in a subprocess; returns the CompletedProcess."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("MAXL_FAULT", None)
    if fault:
        env["MAXL_FAULT"] = fault
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "mock_data_cli.py"),
         "--config=experiments/configs/tiny.py", "--config.dataset=cifar100",
         "--config.primary_level=20", f"--workdir={workdir}", "--noprogress", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def summary(workdir) -> dict:
    s = json.loads((pathlib.Path(workdir) / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in SUMMARY_TIMINGS}


def assert_same_run(a, b):
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
    assert records(a) == records(b)
    assert summary(a) == summary(b)


RUN = ("--config.epochs=3", "--config.checkpoint_every_steps=2")  # 6 steps an epoch, 18 in all


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("whole")
    out = cli(workdir, cache, *RUN)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def test_a_run_killed_at_seeded_moments_and_restarted_ends_as_an_uninterrupted_one(
        uninterrupted, tmp_path, cache):
    # In the order they occur, so each restarted run reaches the next: a seeded step inside each
    # epoch, and the moments between an epoch's last step and its end-of-epoch checkpoint.
    rng = np.random.default_rng(0)
    faults = [
        f"event:{rng.integers(1, 6)}",
        "saved:6",    # the checkpoint at epoch 1's last step, before its evaluation and record
        f"event:{rng.integers(7, 12)}",
        "eval:2",     # during epoch 2's evaluation (its last step is checkpointed: step 12)
        f"event:{rng.integers(13, 18)}",
        "record:3",   # epoch 3's record written, its end-of-epoch save not yet made
    ]
    outcomes = []
    for fault in faults:
        out = cli(tmp_path, cache, *RUN, fault=fault)
        outcomes.append((fault, out.returncode))
        assert out.returncode in (-signal.SIGKILL, 0), out.stderr[-3000:]
    out = cli(tmp_path, cache, *RUN)
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(rc == -signal.SIGKILL for _, rc in outcomes), outcomes
    assert_same_run(uninterrupted, tmp_path)


@pytest.mark.parametrize("sig, code", [("INT", 130), ("TERM", 143)])
def test_sigint_and_sigterm_save_exit_cleanly_and_resume_exactly(uninterrupted, tmp_path, cache,
                                                                 sig, code):
    out = cli(tmp_path, cache, *RUN, fault=f"event:9={sig}")
    assert out.returncode == code, out.stderr[-3000:]
    assert "Interrupted: saved a checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert "run the same command to resume" in out.stderr
    assert cli(tmp_path, cache, *RUN).returncode == 0
    assert_same_run(uninterrupted, tmp_path)


def test_a_real_sigterm_during_training_saves_and_exits_143(tmp_path, cache):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "mock_data_cli.py"),
         "--config=experiments/configs/tiny.py", "--config.dataset=cifar100",
         "--config.primary_level=20", f"--workdir={tmp_path}", "--noprogress",
         "--config.epochs=10000"],
        cwd=ROOT, env={**os.environ, "JAX_COMPILATION_CACHE_DIR": cache},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("epoch    2/"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Interrupted: saved a checkpoint" in err and "Traceback" not in err
    assert len(read_state(tmp_path / "checkpoints")) > 0


# ------------------------------------------------------------------------------ checkpoints

def run_in_process(config, workdir):
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        return train.train_and_evaluate(config, workdir, progress=False, log=lambda s: None)


def tiny_config(**overrides):
    c = tiny.get_config()
    c.dataset, c.primary_level, c.data_dir = "cifar100", 20, ""
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two")
    run_in_process(tiny_config(), workdir)
    return workdir


def snapshot(folder: pathlib.Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def damage(workdir: pathlib.Path, how: str) -> None:
    """Damages the newest checkpoint's largest data file: one flipped bit, or truncated."""
    newest = max((p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))
    target = max((f for f in (newest / "state").rglob("*") if f.is_file()),
                 key=lambda f: f.stat().st_size)
    data = bytearray(target.read_bytes())
    if how == "bit":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[: len(data) // 2]
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["bit", "truncate"])
def test_a_damaged_checkpoint_is_refused_untouched_and_the_intact_one_is_named(two_epochs, tmp_path,
                                                                              how):
    workdir = tmp_path / "w"
    shutil.copytree(two_epochs, workdir)
    damage(workdir, how)
    before = snapshot(workdir / "checkpoints")
    with pytest.raises(DamagedCheckpointError) as e:
        run_in_process(tiny_config(epochs=3), workdir)
    message = str(e.value)
    assert str(workdir / "checkpoints" / "12") in message
    assert "newest intact checkpoint is" in message and "--config.resume_step=6" in message
    assert e.value.intact_step == 6
    assert snapshot(workdir / "checkpoints") == before


def test_resuming_from_the_intact_checkpoint_ends_as_an_uninterrupted_run(two_epochs, tmp_path):
    whole = tmp_path / "whole"
    run_in_process(tiny_config(epochs=3), whole)
    workdir = tmp_path / "w"
    shutil.copytree(two_epochs, workdir)
    damage(workdir, "bit")
    run_in_process(tiny_config(epochs=3, resume_from_intact=True), workdir)
    assert (workdir / "damaged_checkpoints").is_dir()  # step 12, set aside intact
    a, b = final_state(whole), final_state(workdir)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert records(whole) == records(workdir)


def test_a_non_finite_step_is_never_saved_and_stops_with_one_message(tmp_path, cache):
    out = cli(tmp_path, cache, "--method=single", "--config.lr=1e30",
              "--config.checkpoint_every_steps=1")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "non-finite" in out.stderr and "Traceback" not in out.stderr
    assert "Lower the learning rate (--config.lr)," in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 4, out.stderr
    checkpoints = tmp_path / "checkpoints"
    for step in (p.name for p in checkpoints.iterdir() if p.name.isdigit()):
        state = read_state(checkpoints, int(step))
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state)
                   if np.issubdtype(np.asarray(x).dtype, np.floating)), step


def test_a_non_finite_meta_rate_is_named(tmp_path, cache):
    """MAXL with --config.generator_lr=1e12 stops non-finite naming --config.generator_lr (the rate
    that is the likely cause), not only --config.lr."""
    out = cli(tmp_path, cache, "--method=maxl", "--config.generator_lr=1e12")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "non-finite" in out.stderr and "--config.generator_lr" in out.stderr, out.stderr


def test_a_failing_save_stops_the_run_with_a_clear_message_without_hanging(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def read_only(self, *a, **k):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(ocp.CheckpointManager, "save", read_only)
    with pytest.raises(CheckpointWriteError, match="cannot write the checkpoint of step .* "
                                                   "Read-only file system.*Training stopped"):
        run_in_process(tiny_config(epochs=1), tmp_path / "w")


def test_an_unwritable_checkpoint_folder_is_refused_before_training(tmp_path, cache):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "checkpoints").symlink_to("/proc/self/fdinfo")  # unwritable, even for root
    out = cli(tmp_path / "w", cache, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "cannot write checkpoints to" in out.stderr and "Nothing was trained" in out.stderr
    assert "Traceback" not in out.stderr


# -------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("field, value, match", [
    ("epochs", 0, r"--config.epochs=0 is out of range: it must be >= 1"),
    ("batch_size", 0, r"--config.batch_size=0 is out of range"),
    ("batch_size", -16, r"--config.batch_size=-16 is out of range"),
    ("lr", 0.0, r"--config.lr=0.0 is out of range: it must be > 0"),
    ("lr", -0.01, r"--config.lr=-0.01 is out of range"),
    ("generator_lr", 0.0, r"--config.generator_lr=0.0 is out of range"),
    ("keep_checkpoints", 0, r"--config.keep_checkpoints=0 .*\(keep at least the final checkpoint\)"),
    ("max_steps_per_epoch", -1, r"--config.max_steps_per_epoch=-1 is out of range"),
    ("train_fraction", 1.5, r"--config.train_fraction=1.5 .* <= 1"),
    ("meta_form", "backprop", r"--config.meta_form='backprop' is not one of"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, field, value, match):
    with pytest.raises(validation.ConfigError, match=match):
        run_in_process(tiny_config(**{field: value}), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_bad_method_settings_name_the_field(tmp_path):
    c = tiny_config(method="auxilearn")
    c.auxilearn.held_out_fraction = 0.0
    with pytest.raises(validation.ConfigError, match=r"--config.auxilearn.held_out_fraction=0.0"):
        run_in_process(c, tmp_path / "w")
    c = tiny_config(method="olaux")
    c.olaux.every = 0
    with pytest.raises(validation.ConfigError, match=r"--config.olaux.every=0"):
        run_in_process(c, tmp_path / "w")
    c = tiny_config(method="wamal", meta_form="reference_first_order")
    with pytest.raises(validation.ConfigError,
                       match=r"--config.meta_form='reference_first_order' is not one of .* for "
                             r"--method=wamal"):
        run_in_process(c, tmp_path / "w")
    c = tiny_config(method="wamal")
    c.wamal.weight_form = "per_batch"
    with pytest.raises(validation.ConfigError,
                       match=r"--config.wamal.weight_form='per_batch' is not one of 'example', "
                             r"'batch'"):
        run_in_process(c, tmp_path / "w")


def test_settings_a_method_ignores_are_reported():
    from maxl_jax import methods
    base, c = tiny.get_config(), tiny.get_config()
    c.psi, c.wamal.weight_range = (5,) * 5, 2.0
    ignored = config_checks.ignored_settings(c, base, methods.get("human"))
    assert ignored == ["psi", "wamal.weight_range"]
    assert config_checks.ignored_settings(c, base, methods.get("maxl")) == ["wamal.weight_range"]


@pytest.mark.parametrize("field, value", [("lr", 0.02), ("augment", True), ("gamma", 1.0),
                                          ("entropy_weight", 0.5)])
def test_a_changed_trajectory_setting_on_resume_is_refused(two_epochs, tmp_path, field, value):
    workdir = tmp_path / "w"
    shutil.copytree(two_epochs, workdir)
    with pytest.raises(CheckpointError, match=f"different run.*{field}: checkpoint"):
        run_in_process(tiny_config(epochs=3, **{field: value}), workdir)


def test_two_processes_cannot_train_in_one_workdir(tmp_path, cache):
    with train.WorkdirLock(tmp_path):
        out = cli(tmp_path, cache, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"is in use by process {os.getpid()}" in out.stderr and "Traceback" not in out.stderr


def test_a_torn_last_record_is_redone_and_a_lost_metrics_file_is_reported(two_epochs, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(two_epochs, workdir)
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # a write cut by a kill
    run_in_process(tiny_config(epochs=3), workdir)
    assert [r["epoch"] for r in records(workdir)] == [0, 1, 2]
    assert records(workdir)[:2] == records(two_epochs)

    lost = tmp_path / "lost"
    shutil.copytree(two_epochs, lost)
    (lost / "metrics.jsonl").unlink()
    logged = []
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        s = train.train_and_evaluate(tiny_config(epochs=3), lost, progress=False,
                                     log=logged.append)
    assert any("no record of epoch(s) [1]" in line for line in logged), logged
    assert s["complete"] is False and s["missing_epochs"] == [1]
    assert [r["epoch"] for r in records(lost)] == [1, 2]  # epoch 2 rebuilt, epoch 3 trained
    assert s["best_epoch"] in (2, 3)


def test_a_meta_step_that_would_never_run_is_refused(tmp_path):
    c = tiny_config(method="auxilearn")  # 64 mock examples, a quarter held out: 2 steps an epoch
    c.auxilearn.every = 30
    with pytest.raises(ValueError, match=r"every 30 training steps but an epoch has 2: it would "
                                         r"never run\. Lower --config.auxilearn.every to at most 2"):
        run_in_process(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_resumed_epoch_reports_the_whole_epochs_time_and_throughput(tmp_path, cache):
    """Killed at step 12 of a 16-step MAXL epoch (8 training steps of the 64 mock images, then 8
    meta steps) just after its checkpoint, then resumed: the epoch's record counts all 8 training
    steps in its throughput (images/s x time = 8 batches) and its time includes the part before
    the kill, so the summary's numbers are an uninterrupted run's, not those of the last 4 meta
    steps (0 images/s)."""
    flags = ("--config.method=maxl", "--config.epochs=1", "--config.max_steps_per_epoch=8",
             "--config.checkpoint_every_steps=4", "--config.batch_size=8")
    killed = cli(tmp_path / "w", cache, *flags, fault="event:12")
    assert killed.returncode == -9, killed.stderr[-2000:]
    clock = json.loads((tmp_path / "w" / "epoch_clock.json").read_text())
    assert clock["step"] == 12 and clock["trained"] == 8 and clock["elapsed_s"] > 0
    out = cli(tmp_path / "w", cache, *flags)
    assert out.returncode == 0, out.stderr[-2000:]
    (record,) = [json.loads(line) for line in
                 (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert "epoch_time_partial" not in record
    assert record["epoch_time"] > clock["elapsed_s"]
    np.testing.assert_allclose(record["train_images_per_sec"] * record["epoch_time"] / 8, 8,
                               rtol=1e-6)
    s = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert s["train_time_complete"] and s["train_images_per_sec"] > 0


def test_an_unwritable_metrics_file_mid_run_is_one_message_and_the_epoch_is_kept(
        tmp_path, two_epochs, monkeypatch):
    """Writing epoch 2's record fails (permission denied): a ``RunFilesError`` naming the file and
    the fix, not a raw ``PermissionError``; epoch 2's checkpoint is saved first, so the same run
    resumed once the file is writable rebuilds the record and ends as an uninterrupted run."""
    real = train._append_record
    calls = []

    def failing(path, record):
        calls.append(record["epoch"])
        if record["epoch"] == 1:
            raise PermissionError(13, "Permission denied", str(path))
        real(path, record)

    monkeypatch.setattr(train, "_append_record", failing)
    with pytest.raises(train.RunFilesError, match=r"cannot write .*metrics.jsonl \(PermissionError"
                                                  r".*after epoch 2, whose checkpoint is saved"):
        run_in_process(tiny_config(), tmp_path / "w")
    assert calls == [0, 1] and not (tmp_path / "w" / "summary.json").exists()
    monkeypatch.setattr(train, "_append_record", real)
    run_in_process(tiny_config(), tmp_path / "w")
    assert_same_run(two_epochs, tmp_path / "w")


def test_checkpoints_left_beyond_keep_by_an_interrupted_pruning_are_deleted_once_complete(
        tmp_path):
    """A complete run holding more checkpoints than ``keep_checkpoints`` (what a kill between the
    final save and Orbax's pruning leaves; here made by lowering the setting) keeps only the newest
    ``keep_checkpoints`` when the command is run again, and its results are untouched."""
    run_in_process(tiny_config(checkpoint_every_steps=2, keep_checkpoints=4), tmp_path / "w")
    ckpts = tmp_path / "w" / "checkpoints"
    before = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert len(before) == 4
    summary_text = (tmp_path / "w" / "summary.json").read_text()
    out = run_in_process(tiny_config(checkpoint_every_steps=2, keep_checkpoints=2), tmp_path / "w")
    assert out["already_complete"]
    after = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert after == before[-2:]
    assert (tmp_path / "w" / "summary.json").read_text() == summary_text


def test_a_damaged_run_record_in_the_newest_checkpoint_falls_back_to_the_intact_one(
        two_epochs, tmp_path):
    """The newest checkpoint's ``run/metadata`` (the run's identity) unreadable: refused naming the
    intact checkpoint, and ``resume_from_intact`` resumes from it like any other damage (the
    identity check runs inside the restore's error handling)."""
    workdir = tmp_path / "w"
    shutil.copytree(two_epochs, workdir)
    (workdir / "checkpoints" / "12" / "run" / "metadata").write_text('{"method": "ma')
    with pytest.raises(DamagedCheckpointError) as e:
        run_in_process(tiny_config(epochs=3), workdir)
    assert e.value.intact_step == 6 and "--config.resume_step=6" in str(e.value)
    run_in_process(tiny_config(epochs=3, resume_from_intact=True), workdir)
    assert (workdir / "damaged_checkpoints").is_dir()
    assert [r["epoch"] for r in records(workdir)] == [0, 1, 2]

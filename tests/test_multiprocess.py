"""Several cooperating processes (``maxl_jax.distributed``): two processes on 127.0.0.1, each with two
fake CPU devices and Gloo collectives, against one process with four.

* A run whose first steps are taken by the two processes, one step a call (stopped by a SIGTERM
  that only process 1 receives: both stop at the same step, save one checkpoint and exit 143) and
  finished by one process, and a run started by one process and finished by the two, two steps a
  call, end with the parameters of an uninterrupted one-process run, relative 1e-6 (the
  cross-process sums are Gloo's, in another order than the in-process ones: not bit-identical);
  their ``metrics.jsonl`` agree likewise.
* Only process 0 logs; process 1 prints no epoch line.
* Partial or inconsistent multi-process settings are refused before JAX starts; with none, the run
  stays one process.
* A workdir in use is refused by every process of a 2-process run, promptly.
* With nothing given, a SLURM job of several tasks is detected as a multi-process cluster (JAX's
  own detection), one task is not; inside one, ``jax.distributed.initialize`` gets what was given
  and JAX fills in the rest; ``--num_processes=1`` keeps one process there.

Every method runs with ``-m slow``; the default suite runs MAXL (one theta1 and one theta2 pass per
epoch, its second-order meta step synchronising BatchNorm and the meta-gradient across processes):
each case starts 2-process runs that compile their programs in both processes (about two minutes of
a two-core CPU per method), too long for every method in every run of the suite on three stacks
within CI's budget.
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxl_jax import distributed, methods

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mock_data_cli import NUM_EXAMPLES  # noqa: E402
from run_outputs import final_state, records  # noqa: E402

TIMEOUT = 600  # seconds for one run; both processes are killed past it
RTOL = 1e-6

pytestmark = pytest.mark.xdist_group("test_multiprocess")  # its runs load both CPU cores


def _env(devices: int, fault: str | None = None) -> dict:
    env = {**os.environ, "MAXL_MOCK_EXAMPLES": str(NUM_EXAMPLES),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + f" --xla_force_host_platform_device_count={devices}")}
    for var in ("MAXL_FAULT", *(v for names in distributed.ENV.values() for v in names)):
        env.pop(var, None)
    if fault:
        env["MAXL_FAULT"] = fault
    return env


def _command(workdir, method, *flags) -> list:
    return [sys.executable, str(ROOT / "tests" / "mock_data_cli.py"),
            "--config=experiments/configs/tiny.py", "--config.dataset=cifar100",
            "--config.primary_level=20", f"--method={method}", f"--workdir={workdir}",
            "--noprogress", *flags]


def one_process(workdir, method, *flags, devices=4):
    out = subprocess.run(_command(workdir, method, *flags), cwd=ROOT, env=_env(devices),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(workdir, method, *flags, fault_in_1=None, expect=0):
    """The command line as processes 0 and 1 of a 2-process run (2 fake CPU devices each); returns
    their ``(returncode, stdout, stderr)``. Both are killed if either outlives ``TIMEOUT``."""
    port = _free_port()
    procs = []
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                _command(workdir, method, *flags, f"--coordinator_address=127.0.0.1:{port}",
                         "--num_processes=2", f"--process_id={i}"),
                cwd=ROOT, env=_env(2, fault_in_1 if i == 1 else None), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]
    for i, (code, o, e) in enumerate(results):
        assert code == expect, f"process {i} exited {code}\n{o[-2000:]}\n{e[-3000:]}"
    return results


def assert_close_states(a: dict, b: dict):
    """Relative 1e-6: each value within 1e-6 of its own size, or of the largest value of its
    collection (parameters, BatchNorm statistics, running sums) for values near 0 (a bias under
    BatchNorm, whose gradient is rounding noise)."""
    assert a.keys() == b.keys()
    scale = {}
    for key, x in a.items():
        if np.issubdtype(x.dtype, np.floating) and x.size:
            top = key.split("]")[0]
            scale[top] = max(scale.get(top, 0.0), float(np.max(np.abs(x))))
    for key, x in a.items():
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(b[key], x, rtol=RTOL,
                                       atol=RTOL * scale.get(key.split("]")[0], 0.0), err_msg=key)
        else:
            np.testing.assert_array_equal(b[key], x, err_msg=key)


def assert_close_records(a: list, b: list):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["epoch"] == y["epoch"]
        for part in ("train", "meta", "test"):
            assert x.get(part, {}).keys() == y.get(part, {}).keys(), part
            for k, v in x.get(part, {}).items():
                np.testing.assert_allclose(y[part][k], v, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{part} {k}")


CASES = [pytest.param(m, marks=() if m == "maxl" else pytest.mark.slow)
         for m in methods.names()]


@pytest.mark.parametrize("method", CASES)
def test_two_processes_and_one_resume_each_other_with_the_one_process_numbers(method, tmp_path):
    whole, two_then_one, one_then_two = (tmp_path / "whole", tmp_path / "two_then_one",
                                         tmp_path / "one_then_two")
    one_process(whole, method)  # 2 epochs, 4 devices

    # Two processes from the start; SIGTERM to process 1 alone after the run's 2nd step.
    stopped = two_processes(two_then_one, method, fault_in_1="event:2=TERM", expect=143)
    for _, _, err in stopped:
        assert "Interrupted: saved a checkpoint" in err
    assert "epoch" not in stopped[1][1]  # process 1 writes no log
    one_process(two_then_one, method)

    # One process for the first epoch, two for the second.
    one_process(one_then_two, method, "--config.epochs=1")
    # Two steps a call (the chunked programs: stacked index shards, a chunk cut short by the end of a
    # pass), and download=True (process 0 looks for the data first, the others after it).
    done = two_processes(one_then_two, method, "--config.steps_per_call=2",
                         "--config.download=True")
    assert "final test accuracy" in done[0][1] and "epoch    2/2" in done[0][1]
    assert "epoch" not in done[1][1]
    assert (one_then_two / "summary.json").exists()

    reference = final_state(whole)
    for run in (two_then_one, one_then_two):
        assert_close_states(reference, final_state(run))
        assert_close_records(records(whole), records(run))


def test_partial_or_bad_multiprocess_settings_are_refused(monkeypatch):
    for var in (v for names in distributed.ENV.values() for v in names):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="missing: --num_processes, --process_id"):
        distributed.initialize("127.0.0.1:1234")
    monkeypatch.setenv("MAXL_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="missing: --coordinator_address"):
        distributed.initialize(process_id=0)
    with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", process_id=2)
    # One process in all: nothing to start.
    assert distributed.initialize("127.0.0.1:1234", num_processes=1, process_id=0) is False
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # even inside a cluster of several tasks, alone
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert distributed.initialize(num_processes=1) is False
    for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID"):
        monkeypatch.delenv(var)
    monkeypatch.delenv("MAXL_NUM_PROCESSES")
    assert distributed.initialize() is False  # nothing given, no cluster: one process
    assert jax.process_count() == 1 and not jax.distributed.is_initialized()


def test_a_partial_setting_on_the_command_line_exits_2_before_training(tmp_path):
    out = subprocess.run(_command(tmp_path / "w", "single", "--num_processes=2"), cwd=ROOT,
                         env=_env(1), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "missing: --coordinator_address, --process_id" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()


def test_a_workdir_in_use_refuses_every_process_of_a_two_process_run(tmp_path):
    """Process 0 takes the workdir lock for all; its refusal reaches process 1, which exits too
    (instead of waiting for a partner that left)."""
    import fcntl
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".maxl.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("the test's holder\n")
        held.flush()
        results = two_processes(tmp_path, "single", expect=2)
    for _, _, err in results:
        assert "is in use by the test's holder" in err
    assert not (tmp_path / "checkpoints").exists()


def test_a_slurm_job_of_several_tasks_is_detected_and_one_task_is_not(monkeypatch):
    """With no settings given, JAX's own cluster detection decides (here SLURM's variables)."""
    for var in (v for names in distributed.ENV.values() for v in names):
        monkeypatch.delenv(var, raising=False)
    assert distributed.detected_cluster() is None
    for var, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[1-2]",
                       "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(var, value)
    assert distributed.detected_cluster() == "slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detected_cluster() is None


def test_on_a_detected_cluster_jax_fills_in_what_is_not_given(monkeypatch):
    """Inside a SLURM job of several tasks, ``jax.distributed.initialize`` is called (JAX's own
    detection supplies the rest), with what was given passed on; outside one, a partial setting
    is an error (the test above)."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "_use_gloo", lambda: calls.append("gloo"))
    for var in (v for names in distributed.ENV.values() for v in names):
        monkeypatch.delenv(var, raising=False)
    for var, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[1-2]",
                       "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(var, value)
    assert distributed.initialize() is True
    monkeypatch.setenv("MAXL_COORDINATOR_ADDRESS", "node1:4321")
    assert distributed.initialize() is True
    none = {"coordinator_address": None, "num_processes": None, "process_id": None}
    assert calls == ["gloo", none, "gloo", {**none, "coordinator_address": "node1:4321"}]

"""The training loop end to end: every method runs, learning happens on real data, a resumed run
equals an uninterrupted one, and bad checkpoints, data or settings fail with a clear message."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import tiny
from maxl_jax import data as data_lib
from maxl_jax import train
from maxl_jax.checkpoint import CheckpointError

# Its module-scoped fixtures are computed once: its tests run in one worker under pytest-xdist.
pytestmark = pytest.mark.xdist_group("test_train")

SHARED = data_lib.shared_data_dir()
needs_fmnist = pytest.mark.skipif(
    SHARED is None or not (SHARED / "fashion_mnist").is_dir(),
    reason=f"real Fashion-MNIST not found: set {data_lib.SHARED_DATA_ENV} to the shared data folder "
           f"(default ../shared/data beside the repository)")


def tiny_config(**overrides):
    c = tiny.get_config()
    c.dataset = "cifar100"
    c.primary_level = 20
    c.data_dir = ""
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def run(config, workdir, **kw):
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        return train.train_and_evaluate(config, workdir, progress=False, log=lambda s: None, **kw)


def flat_params(state):
    leaves = jax.tree_util.tree_leaves((state.multitask_params, state.multitask_batch_stats,
                                        state.method_state))
    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves])


@pytest.fixture(scope="module")
def maxl_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("maxl")
    return workdir, run(tiny_config(method="maxl"), workdir)


@pytest.mark.parametrize("method", ["single", "human", "random"])
def test_one_epoch_of_each_baseline_runs_and_writes_its_outputs(method, tmp_path):
    summary = run(tiny_config(method=method, epochs=1), tmp_path)
    check_outputs(summary, tmp_path, epochs=1, meta=False)


def test_maxl_runs_and_reports_the_meta_step(maxl_run):
    workdir, summary = maxl_run
    records = check_outputs(summary, workdir, epochs=2, meta=True)
    t2 = records[-1]["meta"]
    for key in ("meta_loss", "primary_before", "primary_after", "grad_norm", "label_entropy"):
        assert np.isfinite(t2[key]), key
    usage = records[-1]["label_usage"]
    assert len(usage["usage_entropy"]) == 20 and all(0 <= u <= 1 + 1e-6 for u in usage["usage_entropy"])
    assert int(summary["state"].meta_step) == 2 * 3 and int(summary["state"].step) == 2 * 3


def check_outputs(summary, workdir, epochs, meta):
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(epochs))
    assert all(("meta" in r) == meta for r in records)
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    saved = json.loads((workdir / "summary.json").read_text())
    assert saved["final_test_accuracy"] == summary["final_test_accuracy"]
    assert saved["best_test_accuracy"] == max(r["test"]["accuracy"] for r in records)
    assert (workdir / "learning_curves.png").stat().st_size > 10_000
    assert (workdir / "checkpoints").is_dir()
    return records


def test_a_resumed_run_ends_with_the_same_parameters(maxl_run, tmp_path, monkeypatch):
    _, uninterrupted = maxl_run
    original = train._Compiled.compile
    calls = {"n": 0}

    def compile_then_interrupt(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        meta = self.meta

        def meta_then_interrupt(*a):
            calls["n"] += 1
            if calls["n"] == 5:  # mid-way through pass B of the second epoch
                raise KeyboardInterrupt("simulated Ctrl-C")
            return meta(*a)

        self.meta = meta_then_interrupt
        return out

    monkeypatch.setattr(train._Compiled, "compile", compile_then_interrupt)
    with pytest.raises(train.Interrupted):
        run(tiny_config(method="maxl"), tmp_path)
    monkeypatch.setattr(train._Compiled, "compile", original)
    resumed = run(tiny_config(method="maxl"), tmp_path)
    a, b = flat_params(resumed["state"]), flat_params(uninterrupted["state"])
    assert np.max(np.abs(a - b)) <= 1e-6 * max(1.0, np.max(np.abs(b)))
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
    # The resumed epoch's training metrics cover the whole epoch, as uninterrupted.
    reference = [json.loads(l) for l in (maxl_run[0] / "metrics.jsonl").read_text().splitlines()]
    for kind in ("train", "meta"):
        assert records[1][kind] == reference[1][kind], kind


def test_a_checkpoint_of_another_run_is_refused_and_kept(maxl_run, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(maxl_run[0], workdir)
    before = snapshot(workdir / "checkpoints")
    with pytest.raises(CheckpointError, match="different run.*method: checkpoint 'maxl' vs this run 'single'"):
        run(tiny_config(method="single", epochs=3), workdir)
    assert snapshot(workdir / "checkpoints") == before


def test_a_corrupt_checkpoint_gives_a_clear_error_and_is_never_overwritten(maxl_run, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(maxl_run[0], workdir)
    latest = max((p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))
    for f in (latest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    before = snapshot(workdir / "checkpoints")
    with pytest.raises(CheckpointError, match=f"{latest}.*left untouched"):
        run(tiny_config(method="maxl", epochs=3), workdir)
    assert snapshot(workdir / "checkpoints") == before


def snapshot(folder: pathlib.Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_missing_dataset_names_the_dataset_the_directory_and_the_fix(tmp_path):
    with pytest.raises(data_lib.DatasetNotFoundError, match="cifar100") as e:
        train.train_and_evaluate(tiny_config(data_dir=str(tmp_path), download=False),
                                 tmp_path / "w", progress=False)
    assert str(tmp_path) in str(e.value) and "tfds build" in str(e.value)
    assert not (tmp_path / "w").exists()  # a failed start leaves no workdir


@pytest.mark.parametrize("psi, match", [((5, 5), "psi has 2 entries but the primary task has 20"),
                                        ((5,) * 19 + (0,), r"psi\[19\] = 0 is not positive")])
def test_a_bad_psi_is_rejected_before_training(psi, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run(tiny_config(psi=psi), tmp_path)


def test_a_non_finite_loss_stops_training_naming_the_step_and_quantity(tmp_path):
    with pytest.raises(train.NonFiniteError, match=r"non-finite (loss|primary_loss|grad_norm|update_norm|param_norm)=(nan|inf|-inf).* at train step \d+ \(epoch 1\)"):
        run(tiny_config(method="single", lr=1e30, epochs=1), tmp_path)


@needs_fmnist
def test_on_real_fashion_mnist_the_loss_falls_and_accuracy_beats_chance(tmp_path):
    config = tiny.get_config()
    config.dataset = "fashion_mnist"
    config.primary_level = 0
    config.data_dir = str(SHARED / "fashion_mnist")
    config.method = "single"
    config.train_fraction = 0.05        # 3,000 real images, 300 per class
    config.width, config.batch_size, config.epochs = 8, 50, 3
    config.max_steps_per_epoch, config.lr, config.eval_batch_size = 0, 0.05, 1000
    summary = train.train_and_evaluate(config, tmp_path, progress=False, log=lambda s: None)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train"]["primary_loss"] for r in records]
    assert losses[-1] < 0.7 * losses[0], losses
    assert summary["final_test_accuracy"] > 0.5  # chance is 0.1 on the 10,000 real test images


@pytest.mark.slow  # op-by-op execution takes about 90 s on 2 cores
def test_noxla_runs_the_same_code_uncompiled(tmp_path):
    config = tiny_config(method="single", epochs=1, max_steps_per_epoch=1)
    compiled = run(config, tmp_path / "xla")
    eager = run(config, tmp_path / "noxla", xla=False)
    np.testing.assert_allclose(flat_params(eager["state"]), flat_params(compiled["state"]),
                               rtol=1e-4, atol=1e-5)


@needs_fmnist
def test_the_command_line_entry_point_trains_and_reports(tmp_path):
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "experiments.cifar", "--xla", "--noprogress",
         "--config=experiments/configs/tiny.py", "--method=random",
         f"--config.data_dir={SHARED / 'fashion_mnist'}", "--config.epochs=1",
         f"--workdir={tmp_path}"],
        cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "epoch    1/1" in out.stdout and "final test accuracy" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "random" and summary["dataset"] == "fashion_mnist_coarse"


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def without_timings(workdir) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items()
             if k not in ("epoch_time", "train_images_per_sec")} for line in lines]


@pytest.mark.parametrize("method", ["maxl"])
def test_chunks_of_steps_in_one_call_give_the_step_by_step_run(method, tmp_path):
    """``steps_per_call=3``: scans of up to 3 steps of one kind, cut short at the end of the
    epoch's training pass and wherever ``checkpoint_every_steps=3`` asks for a checkpoint (MAXL: 4
    training then 4 meta steps an epoch; an interleaved schedule in chunks, on 2 devices: AuxiLearn
    in tests/test_every_method.py).
    Against one step per call: the same parameters, the same records, checkpoints at the same steps,
    and a run resumed with another chunk size ends the same."""
    common = dict(method=method, max_steps_per_epoch=4, checkpoint_every_steps=3,
                  keep_checkpoints=100)
    one = run(tiny_config(steps_per_call=1, **common), tmp_path / "one")
    chunked = run(tiny_config(steps_per_call=3, **common), tmp_path / "chunked")
    run(tiny_config(steps_per_call=3, epochs=1, **common), tmp_path / "mixed")
    mixed = run(tiny_config(steps_per_call=2, **common), tmp_path / "mixed")
    for other in (chunked, mixed):
        assert int(other["state"].step) == int(one["state"].step) >= 4
        np.testing.assert_allclose(flat_params(other["state"]), flat_params(one["state"]),
                                   rtol=1e-6, atol=1e-7)
        assert int(other["state"].meta_step) == int(one["state"].meta_step) > 0
    for name in ("chunked", "mixed"):
        a, b = without_timings(tmp_path / "one"), without_timings(tmp_path / name)
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or all(
            np.allclose(np.asarray(jax.tree_util.tree_leaves(x), float),
                        np.asarray(jax.tree_util.tree_leaves(y), float), rtol=1e-5)
            for x, y in zip(a, b))
    steps = checkpoint_steps(tmp_path / "one")
    assert steps == checkpoint_steps(tmp_path / "chunked")
    assert set(range(3, steps[-1] + 1, 3)) <= set(steps)  # every third step, and each epoch's end


def test_a_non_finite_step_inside_a_chunk_is_named_as_step_by_step(tmp_path):
    errors = []
    for k in (1, 3):
        with pytest.raises(train.NonFiniteError) as info:
            run(tiny_config(method="single", lr=1e30, epochs=1, steps_per_call=k),
                tmp_path / str(k))
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert checkpoint_steps(tmp_path / "3") == []  # nothing non-finite was saved


def test_eval_every_evaluates_every_nth_and_the_reported_last_k_epochs(tmp_path):
    """eval_every=3, 6 epochs, last_k=2: epochs 3, 5 and 6 are evaluated (the 3rd, then the last
    two, which the summary averages), the others' records carry no test entry; the parameters
    are those of a run that evaluates every epoch (evaluation changes nothing)."""
    sparse = run(tiny_config(method="single", epochs=6, last_k=2, eval_every=3,
                             max_steps_per_epoch=1), tmp_path / "sparse")
    dense = run(tiny_config(method="single", epochs=6, last_k=2, max_steps_per_epoch=1),
                tmp_path / "dense")
    records = [json.loads(l) for l in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] + 1 for r in records if "test" in r] == [3, 5, 6]
    acc = dense["test_accuracy"]
    assert sparse["test_accuracy"] == [None, None, acc[2], None, acc[4], acc[5]]
    assert sparse["last_k_mean_test_accuracy"] == pytest.approx(np.mean(acc[-2:]))
    assert sparse["final_test_accuracy"] == acc[5] and sparse["complete"]
    np.testing.assert_array_equal(flat_params(sparse["state"]), flat_params(dense["state"]))


def test_summary_records_the_psi_used_and_the_configs_last_k(tmp_path):
    """A run whose psi comes from aux_per_class (config.psi empty) records the psi its labels
    used; last_k is the config's even when fewer epochs were evaluated, and last_k_evaluated says
    how many the mean covers."""
    config = tiny_config(method="random", epochs=1, last_k=3, max_steps_per_epoch=1)
    config.psi, config.aux_per_class = (), 2
    summary = run(config, tmp_path / "r")
    assert summary["psi"] == [2] * 20 and summary["aux_tasks"] == [["random", [2] * 20]]
    assert summary["last_k"] == 3 and summary["last_k_evaluated"] == 1
    on_disk = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert on_disk["psi"] == [2] * 20 and on_disk["last_k"] == 3


def test_resume_step_needs_a_checkpoint_and_is_not_negative(tmp_path):
    """--config.resume_step=-1 is refused by the config check; a positive one on a workdir without
    checkpoints is refused instead of training from scratch."""
    from maxl_jax import validation

    with pytest.raises(validation.ConfigError, match=r"resume_step=-1 is out of range.*>= 0"):
        run(tiny_config(method="single", resume_step=-1), tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"resume_step=6 .* holds no checkpoint: drop"):
        run(tiny_config(method="single", resume_step=6), tmp_path / "b")

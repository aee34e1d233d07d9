"""The method benchmark's grid, runner and statistics (experiments/benchmark.py)."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np
import pytest

from experiments import benchmark as B
from maxl_jax import methods


def test_every_method_runs_in_every_protocol_with_its_defaults():
    """Each protocol has a variant of every registered method (human only where the data set has
    fine labels), and a cell's config keeps every method's documented defaults except the
    variant's named overrides."""
    from experiments.configs import default

    base = default.get_config()
    for name, spec in B.PROTOCOLS.items():
        used = {v.method for v in spec.variants.values()}
        has_fine = spec.dataset in ("cifar100", "fashion_mnist_coarse")
        expected = set(methods.names()) - (set() if has_fine else {"human"})
        assert used == expected, name
        for variant in spec.variants:
            c = B.cell_config(name, variant, 1, data_dir="/d")
            v = spec.variants[variant]
            overridden = {f.split(".")[0] for f, _ in v.overrides}
            for m in methods.defaults():
                if m not in overridden:
                    assert c[m].to_dict() == base[m].to_dict(), (name, variant, m)
            assert c.method == v.method and c.seed == 1 and c.psi == v.psi
            assert c.last_k == max(1, c.epochs // 10) and c.eval_split == "test"
            assert c.arch == ("vgg16" if spec.accelerator else "small")


def test_the_issue_variants_are_there():
    """MAXL's exact and finite-difference forms on EMNIST; psi 2 and 5 for MAXL and random labels;
    AuxiLearn's linear and nonlinear combiners; the human task beside random labels on coarse."""
    em = B.PROTOCOLS["emnist_letters_low"].variants
    assert em["maxl_fd_psi5"].overrides == (("meta_form", "finite_difference"),)
    assert em["maxl_psi2"].psi == (2,) * 26 and em["random_psi5"].psi == (5,) * 26
    c = B.cell_config("emnist_letters_low", "auxilearn_nonlinear", 0, data_dir="/d")
    assert c.auxilearn.combiner == "nonlinear" and c.aux_tasks == "random"
    assert B.cell_config("emnist_letters_low", "maxl_fd_psi5", 0, data_dir="/d").meta_form == \
        "finite_difference"
    coarse = B.PROTOCOLS["fmnist_coarse_low"].variants
    assert all(coarse[k].aux_tasks == "human,random" for k in ("equal", "gcs", "maoal", "olaux"))


def test_paired_difference_matches_a_hand_computed_example():
    """d = (1, 2, 4): mean 7/3, sd sqrt(7/3), half width t(0.975, 2) sd / sqrt(3); zero inside.
    d = (1, 1.1, 0.9): mean 1, sd 0.1, interval [0.7516, 1.2484], zero outside. Seeds missing
    from either side are left out; one paired seed gives no interval."""
    a, b = {0: 1.0, 1: 2.0, 2: 4.0, 7: 9.0}, {0: 0.0, 1: 0.0, 2: 0.0}
    d = B.paired_difference(a, b)
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    half = 4.3027 * sd / math.sqrt(3)
    assert d["n"] == 3 and d["mean"] == pytest.approx(7 / 3) and d["std"] == pytest.approx(sd)
    assert d["low"] == pytest.approx(7 / 3 - half) and d["high"] == pytest.approx(7 / 3 + half)
    assert not d["excludes_zero"]
    d = B.paired_difference({0: 2.0, 1: 2.1, 2: 1.9}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert d["low"] == pytest.approx(0.75159, abs=1e-4) and d["high"] == pytest.approx(1.24841, abs=1e-4)
    assert d["excludes_zero"]
    assert B.paired_difference({0: 1.0}, {0: 0.0, 1: 0.0}) is None


def test_t_quantiles():
    """The table's t_{0.975} values: 12.706 at df 1, 2.776 at df 4, 2.042 at df 30, decreasing."""
    assert B.T975[0] == pytest.approx(12.706, abs=1e-3) and B.T975[3] == pytest.approx(2.776, abs=1e-3)
    assert B.T975[29] == pytest.approx(2.042, abs=1e-3) and all(np.diff(B.T975) < 0)


def test_budget_picks_the_first_budget_within_tolerance_of_every_best():
    """A curve that rises to 90 by epoch 30 and stays; another to 80 by epoch 40. At E = 40 the
    second's last 10% (epochs 37-40) still lies on its ramp, 1.15 below its best; at E = 50 both
    are at their best."""
    a = np.concatenate([np.linspace(50, 90, 30), np.full(30, 90.0)])
    b = np.concatenate([np.linspace(50, 80, 40), np.full(20, 80.0)])
    md, chosen = B.budget_table({"a": a, "b": b}, range(10, 61, 10))
    assert chosen == 50
    assert "| 40 | 90.00 (0.00) | 78.85 (1.15) | no |" in md and md.count("| yes |") == 2
    _, none = B.budget_table({"a": a, "b": b}, range(10, 31, 10))
    assert none is None


def _summary(run_dir: pathlib.Path, **kw):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps({"complete": True, **kw}))


def test_run_state(tmp_path):
    """done: a complete summary; partial: anything else in the folder; new: nothing there."""
    assert B.run_state(tmp_path / "absent") == "new"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "metrics.jsonl").write_text("{}\n")
    assert B.run_state(tmp_path / "p") == "partial"
    (tmp_path / "p" / "summary.json").write_text(json.dumps({"complete": False}))
    assert B.run_state(tmp_path / "p") == "partial"
    _summary(tmp_path / "d")
    assert B.run_state(tmp_path / "d") == "done"


_FAKE = """
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
with open(d.parent.parent / "calls.txt", "a") as f:
    f.write(d.name + "\\n")
if d.name == "seed9":
    sys.exit(3)
(d / "summary.json").write_text(json.dumps({"complete": True, "final_test_accuracy": 0.5,
                                            "last_k_mean_test_accuracy": 0.5, "last_k": 1}))
"""


def test_grid_skips_finished_runs_resumes_partial_ones_and_reports_failures(tmp_path):
    """Finished runs are not started again; a partial one is started (to resume); a failing one is
    reported with its exit code; every started run's output lands in its log.txt."""
    script = tmp_path / "fake.py"
    script.write_text(_FAKE)
    root = tmp_path / "proto" / "v"
    _summary(root / "seed0", final_test_accuracy=0.4)
    (root / "seed1").mkdir(parents=True)
    (root / "seed1" / "metrics.jsonl").write_text("{}\n")
    jobs = [([sys.executable, str(script), str(root / f"seed{s}")], root / f"seed{s}")
            for s in (0, 1, 2, 9)]
    lines = []
    res = B.run_grid(jobs, n_jobs=2, cores=1, log=lines.append, poll_s=0.05)
    calls = sorted((tmp_path / "proto" / "calls.txt").read_text().split())
    assert calls == ["seed1", "seed2", "seed9"]
    assert res["skipped"] == [root / "seed0"] and res["failed"] == [(root / "seed9", 3)]
    assert sorted(res["done"]) == [root / "seed1", root / "seed2"]
    assert "1 finished already, 3 to run" in lines[0]
    assert all((root / f"seed{s}" / "log.txt").exists() for s in (1, 2, 9))
    B.run_grid(jobs[:3], n_jobs=1, cores=1, log=lines.append, poll_s=0.05)
    assert len((tmp_path / "proto" / "calls.txt").read_text().split()) == 3  # nothing re-ran


def test_leaderboard_pairs_by_seed_and_rebuilds_from_files(tmp_path):
    """collect + leaderboard read the run folders alone: the paired difference uses the seeds both
    variants have, the table ranks by the headline (mean of the last k epochs) and the plots
    are written."""
    proto = "fmnist10_low"
    for seed, (single, maxl) in enumerate([(80.0, 81.0), (82.0, 83.5), (81.0, 82.0)]):
        for variant, acc, t in (("single", single, 10.0), ("maxl_psi5", maxl, 40.0)):
            _summary(tmp_path / proto / variant / f"seed{seed}", method=variant.split("_")[0],
                     seed=seed, epochs=3, last_k=1, steps_per_epoch=30, train_time_s=t,
                     final_test_accuracy=acc / 100, last_k_mean_test_accuracy=acc / 100,
                     test_accuracy=[None, 0.7, acc / 100])  # epoch 1 not evaluated
    results = B.collect(proto, tmp_path)
    md, rows = B.leaderboard(proto, results)
    assert [r["variant"] for r in rows] == ["maxl_psi5", "single"]
    d = rows[0]["diff"]
    assert d["n"] == 3 and d["mean"] == pytest.approx(7 / 6) and rows[0]["time_rel"] == pytest.approx(4.0)
    assert "| 1 | maxl_psi5 | 3 | 82.17 +- 1.26" in md and "4.0x" in md
    paths = B.plot_report(proto, rows, tmp_path)
    assert [p.name for p in paths] == [f"{proto}_paired.png", f"{proto}_cost_gain.png",
                                       f"{proto}_curves.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_cli_errors_are_one_line(tmp_path, capsys):
    """An unknown variant in --only and a missing data folder end with a message, not a traceback."""
    with pytest.raises(SystemExit) as info:
        B.main(["run", "--protocol=fmnist10_low", "--only=nope", f"--workdir={tmp_path}"])
    assert info.value.code == 2 and "'nope'] are not variants of fmnist10_low" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no data folder"):
        B.main(["run", "--protocol=fmnist10_low", f"--data-dir={tmp_path / 'absent'}",
                f"--workdir={tmp_path}"])


def test_a_maxl_cell_trains_leaves_its_records_and_the_report_draws_them(tmp_path):
    """`one` on a small EMNIST-shaped data set (2,080 training images, so the protocol's 5% is one
    batch): the records (summary.json, metrics.jsonl, labels.npz) land in the results folder, the
    checkpoints stay in the work folder, and `report` builds the leaderboard and the label grid
    from the records and the data folder alone."""
    import gzip

    from maxl_jax import data as D

    rng = np.random.default_rng(0)
    data = tmp_path / "emnist"
    data.mkdir()
    for split, n in (("train", 2080), ("test", 104)):
        img_name, lbl_name = D.EMNIST_LETTERS_FILES["upright"][split]
        for name, arr in ((img_name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                          (lbl_name, (np.arange(n) % 26).astype(np.uint8))):
            header = (0x0800 | arr.ndim).to_bytes(4, "big") + b"".join(
                d.to_bytes(4, "big") for d in arr.shape)
            with gzip.open(data / name, "wb") as f:
                f.write(header + arr.tobytes())
    results, work = tmp_path / "results", tmp_path / "work"
    rc = B.main(["one", "--protocol=emnist_letters_low", "--variant=maxl_psi2", "--seed=0",
                 f"--run-dir={work / 'x'}", f"--result-dir={results / 'emnist_letters_low' / 'maxl_psi2' / 'seed0'}",
                 "--epochs=2", "--width=4", f"--data-dir={data}"])
    assert rc == 0
    out = results / "emnist_letters_low" / "maxl_psi2" / "seed0"
    assert sorted(p.name for p in out.iterdir()) == ["labels.npz", "metrics.jsonl", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["epochs"] == 2 and summary["config"]["psi"] == [2] * 26
    labels = np.load(out / "labels.npz")
    assert labels["argmax"].shape == (104,) and labels["effective"].shape == (26,)
    assert np.all(labels["argmax"] // 2 == labels["primary"])  # inside the letter's own block
    assert B.run_state(out) == "done" and (work / "x" / "checkpoints").is_dir()
    report = tmp_path / "report"
    assert B.main(["report", "--protocol=emnist_letters_low", f"--results={results}",
                   f"--out={report}", f"--data-dir={data}", "--markdown="]) == 0
    assert (report / "emnist_letters_low.md").read_text().count("maxl_psi2") == 1
    assert (report / "emnist_letters_low_maxl_psi2_labels.png").stat().st_size > 5000


def test_compact_records_keeps_every_field_at_five_digits():
    """Every record and key is kept; numbers (nested in dicts and lists too) keep 5 significant
    digits; integers and strings are untouched."""
    text = json.dumps({"epoch": 3, "train": {"loss": 0.123456789, "usage": [1.23456789, 2]},
                       "name": "x"}) + "\n\n" + json.dumps({"epoch": 4}) + "\n"
    lines = [json.loads(l) for l in B.compact_records(text).splitlines()]
    assert lines == [{"epoch": 3, "train": {"loss": 0.12346, "usage": [1.2346, 2]}, "name": "x"},
                     {"epoch": 4}]


def test_embed_replaces_only_its_protocols_block(tmp_path):
    """The report rewrites the text between a protocol's markers and leaves the rest (another
    protocol's block too) as it was; a file without the markers is left alone."""
    doc = tmp_path / "R.md"
    doc.write_text("intro\n<!-- benchmark:a -->\nold a\n<!-- /benchmark -->\nmiddle\n"
                   "<!-- benchmark:b -->\nold b\n<!-- /benchmark -->\nend\n")
    assert B.embed(doc, "a", "| new |\n")
    assert doc.read_text() == ("intro\n<!-- benchmark:a -->\n| new |\n<!-- /benchmark -->\nmiddle\n"
                               "<!-- benchmark:b -->\nold b\n<!-- /benchmark -->\nend\n")
    assert not B.embed(doc, "c", "x") and not B.embed(tmp_path / "absent.md", "a", "x")


def test_a_run_stopped_by_a_signal_stops_the_grid_instead_of_starting_the_next(tmp_path):
    """A run that exits 130 (it was interrupted: Ctrl-C reaches the whole process group) is not a
    failure to step past: the grid raises KeyboardInterrupt and starts nothing more, so the same
    command resumes it later."""
    script = tmp_path / "fake.py"
    script.write_text(_FAKE.replace('if d.name == "seed9":\n    sys.exit(3)',
                                    'if d.name == "seed1":\n    sys.exit(130)'))
    root = tmp_path / "proto" / "v"
    jobs = [([sys.executable, str(script), str(root / f"seed{s}")], root / f"seed{s}")
            for s in (1, 2, 3)]
    for _, d in jobs:
        d.mkdir(parents=True)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        B.run_grid(jobs, n_jobs=1, cores=1, log=lines.append, poll_s=0.05)
    assert (tmp_path / "proto" / "calls.txt").read_text().split() == ["seed1"]
    assert any("seed1 was interrupted (exit 130" in line for line in lines), lines

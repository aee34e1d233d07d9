"""The study's protocols are the ones issue 5 defines, and its table reports mean +- std correctly."""

import numpy as np

from experiments import study


def test_protocols_define_the_requested_variants():
    coarse = study.PROTOCOLS["fmnist_coarse"]
    assert coarse["dataset"] == "fashion_mnist_coarse" and coarse["train_fraction"] == 1.0
    assert coarse["variants"]["human"] == ("human", None)
    assert coarse["variants"]["maxl_psi_human"] == ("maxl", (4, 1, 1, 3, 1))
    assert coarse["variants"]["maxl_psi_5"] == ("maxl", (5,) * 5)
    assert study.PROTOCOLS["fmnist10"]["variants"]["maxl_psi_5"] == ("maxl", (5,) * 10)
    assert "human" not in study.PROTOCOLS["fmnist10"]["variants"]
    for name in ("fmnist_coarse_low", "fmnist10_low"):
        assert study.PROTOCOLS[name]["train_fraction"] == 0.05


def test_study_config_sets_method_psi_data_and_seed():
    c = study.study_config("fmnist_coarse_low", "maxl_psi_5", 2, "/data")
    assert (c.method, tuple(c.psi), c.seed, c.dataset, c.train_fraction, c.data_dir) == (
        "maxl", (5,) * 5, 2, "fashion_mnist_coarse", 0.05, "/data")
    assert study.study_config("fmnist10", "single", 0, "/d").psi == ()


def test_table_reports_mean_and_sample_std_over_seeds():
    runs = [{"seed": s, "epochs": 3, "last_k": 1, "final_test_accuracy": a, "best_test_accuracy": a,
             "last_k_mean_test_accuracy": a, "wall_time_s": 10.0} for s, a in enumerate([0.8, 0.9])]
    other = [{**r, "final_test_accuracy": r["final_test_accuracy"] + d}
             for r, d in zip(runs, [0.01, 0.03])]
    md = study.table("fmnist10_low", {"single": runs, "maxl_psi_5": other})
    expected = f"{100 * 0.85:.2f} +- {np.std([80.0, 90.0], ddof=1):.2f}"
    assert f"| single | {expected} |" in md
    # Paired by seed: differences +1 and +3 points -> +2.00 +- 1.41.
    assert "| +2.00 +- 1.41 |" in md

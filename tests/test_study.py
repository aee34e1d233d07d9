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
             "last_k_mean_test_accuracy": a, "train_time_s": 10.0} for s, a in enumerate([0.8, 0.9])]
    other = [{**r, "final_test_accuracy": r["final_test_accuracy"] + d}
             for r, d in zip(runs, [0.01, 0.03])]
    md = study.table("fmnist10_low", {"single": runs, "maxl_psi_5": other})
    expected = f"{100 * 0.85:.2f} +- {np.std([80.0, 90.0], ddof=1):.2f}"
    assert f"| single | {expected} |" in md
    # Paired by seed: differences +1 and +3 points -> +2.00 +- 1.41.
    assert "| +2.00 +- 1.41 |" in md


def test_generated_label_summary_counts_argmax_winners_and_effective_classes():
    # psi = (2, 3): class 0 owns aux 0-1, class 1 owns aux 2-4 (other blocks are masked to 0).
    soft = np.array([[0.9, 0.1, 0, 0, 0],
                     [0.8, 0.2, 0, 0, 0],           # class 0: aux 0 always wins
                     [0, 0, 1 / 3, 1 / 3, 1 / 3],
                     [0, 0, 0.2, 0.5, 0.3]])         # class 1: ties go to aux 2, then aux 3 wins
    primary = np.array([0, 0, 1, 1])
    eff, won, ent, counts, owner = study.generated_label_summary(soft, primary, (2, 3))
    np.testing.assert_array_equal(owner, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(counts, [2, 0, 1, 1, 0])
    np.testing.assert_array_equal(won, [1, 2])
    usage0 = np.array([0.85, 0.15])
    np.testing.assert_allclose(eff[0], np.exp(-(usage0 * np.log(usage0)).sum()), rtol=1e-6)
    assert 1.0 < eff[0] < 2.0 and 1.0 < eff[1] <= 3.0
    np.testing.assert_allclose(ent[1], (np.log(3) - (0.2 * np.log(0.2) + 0.5 * np.log(0.5)
                                                      + 0.3 * np.log(0.3))) / 2, rtol=1e-6)


def test_plot_generated_labels_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 5))
    primary = np.repeat([0, 1], 20)
    mask = np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])[primary]
    soft = np.exp(logits) * mask
    soft /= soft.sum(1, keepdims=True)
    np.savez(tmp_path / "labels.npz", soft=soft, primary=primary,
             images=rng.integers(0, 255, size=(40, 28, 28, 1), dtype=np.uint8), psi=np.array([2, 3]),
             primary_names=np.array(["a", "b"]))
    study.plot_generated_labels(tmp_path / "labels.npz", tmp_path / "labels.png")
    assert (tmp_path / "labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

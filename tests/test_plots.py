"""Every plotting helper draws on its own matplotlib Figure (an Agg canvas, no pyplot): it saves
the PNG and returns the Figure, so a notebook displays it inline, and it neither picks a backend
(``matplotlib.use``) nor leaves figures in pyplot's global state. Run in a fresh process, where
nothing else has imported pyplot."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PROGRAM = r"""
import json, pathlib, sys
import matplotlib
import numpy as np
from matplotlib.figure import Figure

backend = matplotlib.rcParams._get_backend_or_none()
from maxl_jax import train
from experiments import benchmark, study

out = pathlib.Path(sys.argv[1])
rng = np.random.default_rng(0)
records = [{"epoch": e, "train": {"primary_loss": 1.0 / (e + 1), "accuracy": 0.5 + 0.1 * e},
            "test": {"loss": 1.1 / (e + 1), "accuracy": 0.45 + 0.1 * e},
            "meta": {"gen_loss": 0.3 - 0.1 * e}} for e in range(3)]
figures = {"learning_curves": train.plot_learning_curves(records, out / "curves.png",
                                                         report=[("gen_loss", "generator")])}
results = {"single": [{"test_accuracy": [0.5, 0.6, 0.7]}, {"test_accuracy": [0.52, 0.61, 0.69]}]}
figures["study.plot_curves"] = study.plot_curves("p", results, out / "study_curves.png")
primary = np.repeat([0, 1], 20)
soft = np.exp(rng.normal(size=(40, 5))) * np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])[primary]
soft /= soft.sum(1, keepdims=True)
images = rng.integers(0, 255, size=(40, 28, 28, 1), dtype=np.uint8)
np.savez(out / "labels.npz", soft=soft, primary=primary, images=images, psi=np.array([2, 3]),
         primary_names=np.array(["a", "b"]))
figures["study.plot_generated_labels"] = study.plot_generated_labels(out / "labels.npz",
                                                                     out / "labels.png")
record = {"psi": np.array([2, 3]), "effective": np.array([1.5, 2.0]), "argmax": soft.argmax(1),
          "primary": primary, "confidence": soft.max(1)}
figures["benchmark.plot_label_grid"] = benchmark.plot_label_grid(record, images, ["a", "b"],
                                                                 out / "grid.png", "t")
rows = [{"variant": v, "diff": d, "time_rel": t, "curves": [[0.5, 0.6, 0.7]]}
        for v, d, t in (("single", None, 1.0),
                        ("maxl", {"mean": 1.0, "low": 0.2, "high": 1.8, "excludes_zero": True}, 3.0))]
report = benchmark.plot_report("p", rows, out)
figures.update({f"benchmark.plot_report:{p.name}": f for p, f in report.items()})
print(json.dumps({"figures": {k: isinstance(f, Figure) for k, f in figures.items()},
                  "pngs": sorted(p.name for p in out.glob("*.png")
                                 if p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"),
                  "pyplot_imported": "matplotlib.pyplot" in sys.modules,
                  "backend_before": backend,
                  "backend_after": matplotlib.rcParams._get_backend_or_none()}))
"""


def test_plot_helpers_return_figures_without_touching_pyplot(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MPLBACKEND", None)
    out = subprocess.run([sys.executable, "-c", _PROGRAM, str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["figures"] and all(got["figures"].values()), got["figures"]
    assert len(got["figures"]) == 7  # four helpers' figures and plot_report's three
    assert got["pngs"] == sorted(["curves.png", "study_curves.png", "labels.png", "grid.png",
                                  "p_paired.png", "p_cost_gain.png", "p_curves.png"])
    assert not got["pyplot_imported"], "a plotting helper imported pyplot"
    assert got["backend_after"] == got["backend_before"], "a plotting helper chose a backend"

"""The Colab notebook runs end to end (its code cells in order, as a script) on the CPU, with a tiny
config on mock data, and leaves its two pictures: so it cannot rot."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "maxl_colab.ipynb"


def test_the_colab_notebook_runs_and_draws_its_pictures(tmp_path):
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    script = tmp_path / "notebook.py"
    script.write_text("import matplotlib\nmatplotlib.use('Agg')\n" + code)
    env = {**os.environ, "MAXL_NOTEBOOK_SMOKE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "final test accuracy" in out.stdout
    run = tmp_path / "runs" / "notebook_maxl"
    for png in ("learning_curves.png", "generated_labels.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

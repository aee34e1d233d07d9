"""The Colab notebook runs end to end (its code cells in order, in one namespace as a kernel runs
them) on the CPU, with a tiny config on mock data, and shows its two pictures inline: each plot
cell's last expression is a matplotlib Figure, which the runner renders as Jupyter does, into an
``image/png`` output of that cell. So it cannot rot, and its plots cannot silently stop showing."""

import base64
import json
import os
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "maxl_colab.ipynb"

# A minimal kernel: each code cell runs in one shared namespace; a cell whose last statement is an
# expression gets its value as the cell's result (as IPython does), a Figure rendered to PNG (as
# IPython's inline matplotlib backend does); display(x) adds an output too. The executed notebook,
# with the outputs, is written to argv[2].
_RUNNER = r"""
import ast, base64, io, json, sys

def rich(value, output_type):
    data = {"text/plain": repr(value)}
    from matplotlib.figure import Figure
    if isinstance(value, Figure):
        buf = io.BytesIO()
        value.savefig(buf, format="png", bbox_inches="tight")
        data["image/png"] = base64.b64encode(buf.getvalue()).decode()
    return {"output_type": output_type, "data": data, "metadata": {}}

nb = json.load(open(sys.argv[1]))
outputs = []
namespace = {"__name__": "__main__",
             "display": lambda *xs: outputs.extend(rich(x, "display_data") for x in xs)}
for cell in nb["cells"]:
    if cell["cell_type"] != "code":
        continue
    outputs = cell["outputs"] = []
    tree = ast.parse("".join(cell["source"]))
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<cell>", "exec"), namespace)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
        if value is not None:
            outputs.append(rich(value, "execute_result"))
json.dump(nb, open(sys.argv[2], "w"))
"""


def test_the_colab_notebook_runs_and_shows_its_plots_inline(tmp_path):
    env = {**os.environ, "MAXL_NOTEBOOK_SMOKE": "1", "PYTHONPATH": str(ROOT)}
    executed = tmp_path / "executed.ipynb"
    out = subprocess.run([sys.executable, "-c", _RUNNER, str(NOTEBOOK), str(executed)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "final test accuracy" in out.stdout
    run = tmp_path / "runs" / "notebook_maxl"
    for png in ("learning_curves.png", "generated_labels.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    cells = [c for c in json.loads(executed.read_text())["cells"] if c["cell_type"] == "code"]
    plot_cells = [c for c in cells if "plot_" in "".join(c["source"])]
    assert len(plot_cells) == 2, "the learning curves and the generated labels"
    for cell in plot_cells:
        images = [o["data"]["image/png"] for o in cell["outputs"] if "image/png" in o["data"]]
        assert len(images) == 1, f"no inline picture from:\n{''.join(cell['source'])}"
        assert base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(o for c in cells if c not in plot_cells for o in c["outputs"]), \
        "a cell other than the plots ends in a value (Colab would print it)"


def test_the_install_cell_finds_an_uploaded_folder_or_zip_of_the_repository(tmp_path):
    """The first cell's ``local_copy``: the repository as a folder in /content, else a zip there
    (GitHub's "Download ZIP" holds one folder, maxl_jax-main/), unpacked; else nothing (a broken
    zip, or a zip of something else, is passed over)."""
    install = next(c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code")
    namespace = {}
    exec("".join(install["source"]), namespace)  # maxl_jax is importable here: installs nothing
    local_copy = namespace["local_copy"]
    assert local_copy(str(tmp_path)) is None
    (tmp_path / "broken.zip").write_bytes(b"not a zip")  # skipped, no crash
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:  # a zip of something else
        z.writestr("images/a.png", "")
    assert local_copy(str(tmp_path)) is None
    with zipfile.ZipFile(tmp_path / "maxl_jax-main.zip", "w") as z:
        z.writestr("maxl_jax-main/setup.cfg", "[metadata]\nname = maxl_jax\n")
        z.writestr("maxl_jax-main/maxl_jax/__init__.py", "")
    found = local_copy(str(tmp_path))
    assert found and pathlib.Path(found, "maxl_jax", "__init__.py").is_file()
    assert pathlib.Path(found).parent.name == "maxl_jax_unzipped"
    folder = tmp_path / "maxl_jax"
    (folder / "maxl_jax").mkdir(parents=True)
    (folder / "setup.cfg").write_text("")
    (folder / "maxl_jax" / "__init__.py").write_text("")
    assert local_copy(str(tmp_path)) == str(folder)  # a folder wins over the zip

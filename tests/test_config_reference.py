"""The config reference (experiments/config_reference.py, ``--helpconfig``, docs/CONFIG.md) covers
every config field with a meaning, and docs/CONFIG.md is the generated text of today's fields."""

import os
import pathlib
import subprocess
import sys

from experiments import config_reference as ref
from experiments.configs import default

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_fields():
    config = default.get_config()
    out = set()
    for k, v in config.items():
        out |= {f"{k}.{f}" for f in v} if hasattr(v, "items") else {k}
    return out


def test_every_config_field_has_a_meaning_and_nothing_else_is_described():
    assert ref.missing() == []
    names = [name for _, rows in ref.reference() for name, *_ in rows]
    assert len(names) == len(set(names))
    assert set(names) == _config_fields()  # no field of get_config() left out of the reference


def test_docs_config_md_is_up_to_date():
    assert (ROOT / "docs" / "CONFIG.md").read_text() == ref.markdown(), \
        "docs/CONFIG.md is stale: run python -m experiments.config_reference --write"


def test_a_new_field_without_a_comment_is_caught_and_sections_are_not_meanings(tmp_path):
    source = (ROOT / "experiments" / "configs" / "default.py").read_text()
    marker = "    c.seed = 0"
    assert marker in source
    changed = tmp_path / "default.py"
    changed.write_text(source.replace(marker, "    # A new section.\n    c.new_field = 3\n" + marker))
    rows = {name: (section, meaning) for section, name, meaning in ref.top_level_fields(changed)}
    assert rows["new_field"] == ("A new section", "")
    assert rows["seed"][0] == "A new section" and rows["seed"][1]
    # A comment continued on the next lines belongs to its field alone, not to the next one.
    assert rows["eval_split"][1].endswith("(to choose budgets without the test set)")
    assert "train_fraction leaves" not in rows["validation_size"][1]


def test_a_method_field_without_a_meaning_is_caught(monkeypatch):
    monkeypatch.delitem(ref.METHOD_FIELDS, "wamal.weight_range")
    assert ref.missing() == ["--config.wamal.weight_range: no meaning"]
    monkeypatch.setitem(ref.METHOD_FIELDS, "wamal.weight_range", "r")
    monkeypatch.setitem(ref.METHOD_FIELDS, "olaux.no_such", "gone")
    assert ref.missing() == ["METHOD_FIELDS['olaux.no_such']: no method has that field"]


def test_helpconfig_prints_every_field_grouped_per_method():
    out = subprocess.run([sys.executable, "-m", "experiments.cifar", "--helpconfig"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == ref.text()
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")
              and not line.startswith("   ")}
    assert _config_fields() <= listed
    assert "Method rlaux (--config.rlaux.<field>):" in out.stdout

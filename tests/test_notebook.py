"""examples/walkthrough.ipynb runs as a notebook runs it: its code cells in order in one namespace, each cell's
last expression displayed (through `_repr_html_` where it has one, as Jupyter does), on the built-in model."""

import ast
import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.ipynb"


def run_notebook(path: Path) -> list:
    """Execute the notebook's code cells; return what each cell displayed (None where nothing)."""
    namespace, shown = {}, []
    for i, cell in enumerate(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"):
        tree = ast.parse("".join(cell["source"]))
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, f"{path.name} cell {i}", "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), f"{path.name} cell {i}", "eval"), namespace) if last else None
        html = getattr(value, "_repr_html_", None)
        shown.append(html() if callable(html) else value)
    return shown


@pytest.mark.slow
def test_walkthrough_notebook_runs(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shown = run_notebook(NOTEBOOK)
    assert shown[0]["isa"]  # lowbit.cpu_isa()
    report_html = shown[1]
    assert "<table>" in report_html and "nf4-aw" in report_html and "What to use" in report_html
    assert (tmp_path / "walkthrough-out" / "report.md").is_file()

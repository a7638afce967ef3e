"""Every notebook's code cells run top to bottom (as CI's stand-in for a Colab run)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _cell_code(source: str) -> str:
    """A cell as a script; its bare last expression (displayed in a notebook) is printed."""
    tree = ast.parse(source)
    last = tree.body[-1] if tree.body else None
    is_print = (
        isinstance(last, ast.Expr)
        and isinstance(last.value, ast.Call)
        and getattr(last.value.func, "id", "") == "print"
    )
    if isinstance(last, ast.Expr) and not is_print:
        call = ast.Call(ast.Name("print", ast.Load()), [last.value], [])
        tree.body[-1] = ast.fix_missing_locations(ast.copy_location(ast.Expr(call), last))
    return ast.unparse(tree)


def _script(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n\n".join(_cell_code("".join(c["source"])) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    result = subprocess.run(
        [sys.executable, "-c", _script(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval/synthcxr/zero_shot_acc" in result.stdout

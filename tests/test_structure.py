"""Code shape: every function short enough to read in one screen (the torchvision/nanoGPT anchors)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deeplab_dropout", "hydra_plugins")
MAX_FUNCTION_LINES = 60


def function_lengths(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """(``file:line qualified.name``, lines) of every def and async def in ``path``, methods included."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    where = f"{path.relative_to(root)}:{child.lineno} {name}"
                    found.append((where, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return found


def test_function_lengths_count_methods_async_and_nested_defs(tmp_path):
    # A guard against a walker that misses functions (and so could never fail).
    src = tmp_path / "pkg" / "mod.py"
    src.parent.mkdir()
    src.write_text("class A:\n"
                   "    async def m(self):\n"
                   "        def inner():\n"
                   "            pass\n"
                   "        return 1\n"
                   "\n"
                   "@staticmethod\n"  # decorators are not counted (lineno is the def line)
                   "def f():\n"
                   "    pass\n")
    assert function_lengths(src, tmp_path) == [
        ("pkg/mod.py:2 A.m", 4), ("pkg/mod.py:3 A.m.inner", 2), ("pkg/mod.py:8 f", 2)]


def test_no_function_longer_than_60_lines():
    files = sorted(f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py"))
    assert files
    long = [f"{where} ({n} lines)"
            for f in files for where, n in function_lengths(f) if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)

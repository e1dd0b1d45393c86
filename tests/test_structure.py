"""Code shape: imports flow one way (no cycle, no private name across modules, the eval app apart from the
train app) and the study's vocabulary has one home. Walks the package's source, as a reader would."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "deeplab_dropout"
VOCABULARY_HOME = f"{PACKAGE}.study"


def module_name(path: Path, root: Path) -> str:
    """``deeplab_dropout/data/voc.py`` -> ``deeplab_dropout.data.voc`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, ast.Module]:
    """Every module of ``package`` under ``root``, parsed."""
    return {module_name(p, root): ast.parse(p.read_text(), filename=str(p))
            for p in sorted((root / package).rglob("*.py"))}


def imports(tree: ast.Module, known: set[str]) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import of a ``known`` module anywhere in ``tree`` (functions
    included): ``from a.b import c`` is (a.b.c, None) when a.b.c is a module, else (a.b, c)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name in known]
        elif isinstance(node, ast.ImportFrom) and node.module in known and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, None) if sub in known else (node.module, alias.name))
    return found


def graph(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    known = set(mods)
    return {name: {m for m, _ in imports(tree, known) if m != name} for name, tree in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def private_uses(mods: dict[str, ast.Module]) -> list[str]:
    """``module: name`` for every private name (``_x``, not dunder) one package module takes from another:
    imported by name, or read as an attribute of an imported package module."""
    known, found = set(mods), []
    for name, tree in mods.items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({(a.asname or a.name): a.name for a in node.names if a.name in known})
            elif isinstance(node, ast.ImportFrom) and node.module in known:
                aliases.update({(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in known})
        for module, imported in imports(tree, known):
            if imported is not None and imported.startswith("_") and not imported.startswith("__"):
                found.append(f"{name}: {module}.{imported}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    return found


def strings_outside_docstrings(tree: ast.Module) -> list[str]:
    """Every string constant in ``tree`` that is not a module, class or function docstring."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_the_walker_sees_cycles_private_names_and_nested_imports(tmp_path):
    # A guard against a walker that could never fail: a package with all three faults.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    import pkg.c\n_hidden = 1\n")
    (pkg / "c.py").write_text("from pkg import a\nx = a._y\n")
    mods = modules(tmp_path, "pkg")
    assert find_cycle(graph(mods)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert sorted(private_uses(mods)) == ["pkg.a: pkg.b._hidden", "pkg.c: pkg.a._y"]
    assert reachable(graph(mods), "pkg.c") == {"pkg.a", "pkg.b", "pkg.c"}


def test_imports_have_no_cycle():
    mods = modules()
    assert len(mods) > 20
    assert find_cycle(graph(mods)) is None


def test_no_private_name_crosses_a_module_boundary():
    assert private_uses(modules()) == []


def test_the_eval_app_does_not_import_the_train_app():
    edges = graph(modules())
    assert f"{PACKAGE}.engine" in reachable(edges, f"{PACKAGE}.eval")
    assert f"{PACKAGE}.train" not in reachable(edges, f"{PACKAGE}.eval")


def test_the_study_vocabulary_has_one_home():
    # Cell names (their dropout family's short word) are spelled in study.py only; docstrings may cite them.
    spelled = {name: [s for s in strings_outside_docstrings(tree) if "chandrop" in s]
               for name, tree in modules().items() if name != VOCABULARY_HOME}
    assert {name: found for name, found in spelled.items() if found} == {}
    assert "chandrop" in "".join(strings_outside_docstrings(modules()[VOCABULARY_HOME]))

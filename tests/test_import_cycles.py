"""No import circles in the project: every module's imports, top-level or inside a function, point one way.

A circle hides which module is the base and which builds on it, and Python only survives one by the luck of
import order (a name used before its module has finished executing). This test reads every .py file of the
project's packages with `ast` (nothing is imported), resolves each import to the project module it loads, and
fails naming every circle it finds. Importing a submodule runs its package's __init__ first; that implicit edge
is not counted (a package's __init__ re-exporting its submodules is the normal, acyclic layout).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "models", "training", "inference", "evaluation", "utils", "configs")


def module_name(file: Path) -> str:
    parts = list(file.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(f): f for package in PACKAGES for f in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `file` (module `name`) imports, anywhere in its body."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from pkg import sub` loads the submodule pkg.sub; `from mod import name` loads mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:      # `import a.b.c` of a name inside a module: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_finder_sees_a_circle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_resolver_follows_relative_and_function_level_imports(tmp_path):
    modules = {"pkg": tmp_path / "__init__.py", "pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n    from . import b\n")
    assert imported_modules("pkg.a", tmp_path / "a.py", modules) == {"pkg.b"}


def test_no_import_circles():
    modules = project_modules()
    graph = {name: imported_modules(name, file, modules) for name, file in modules.items()}
    cycles = find_cycles(graph)
    assert not cycles, "import circles (each line: the modules of one circle):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)

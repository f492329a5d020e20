"""The import graph of our packages: no cycles, and runtime/ stands below the trainers.

Every import is read from the source with ast, module-level and function-level alike (and those under
TYPE_CHECKING: a cycle that only the type checker sees is still two modules that cannot be understood apart), relative
ones resolved against the importing module. An edge goes to the most specific module of ours that the import names:
`from llm.data import prepare` -> llm.data.prepare, `from llm.data.prepare import load_corpus` -> llm.data.prepare.
Parent packages are not edges: importing llm.data.prepare runs llm/__init__.py, but that is the package protocol,
and counting it would flag every package whose __init__ re-exports its submodules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "llm", "vision", "evals")
# runtime/ is shared by the LLM and vision trainers: it may import none of the packages built on it.
RUNTIME_MUST_NOT_IMPORT = ("llm", "vision", "evals")

Graph = dict[str, dict[str, list[int]]]  # module -> imported module of ours -> line numbers


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Module name -> source file of every .py file under the packages."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            modules[module_name(path, root)] = path
    return modules


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """`from ..x import y` inside importer -> the absolute name of `..x` (PEP 328)."""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _ours(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (llm.model.moe.MoELinear -> llm.model.moe)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, list[int]]:
    """Our modules that `name` imports anywhere in its file, with the lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: dict[str, list[int]] = {}

    def add(target: str | None, line: int) -> None:
        if target is not None and target != name:
            found.setdefault(target, []).append(line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_ours(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(name, is_package, node.level, node.module) if node.level else node.module or ""
            for alias in node.names:
                # `from pkg import sub` names the submodule pkg.sub when it is one; otherwise a name in pkg.
                add(_ours(f"{base}.{alias.name}", modules) or _ours(base, modules), node.lineno)
    return found


def build_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> Graph:
    modules = discover(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: Graph) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
    return [_cycle_in(graph, set(c)) for c in sorted(components)]


def _cycle_in(graph: Graph, component: set[str]) -> list[str]:
    """One concrete cycle a -> b -> ... -> a inside a strongly connected component (breadth-first back to start)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in component:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"not a strongly connected component: {sorted(component)}")


def describe(graph: Graph, cycle: list[str]) -> str:
    hops = [f"{a} (line {graph[a][b][0]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "; ".join(hops)


def test_our_packages_have_no_import_cycle() -> None:
    graph = build_graph(REPO)
    assert len(graph) > 50, f"found only {len(graph)} modules under {PACKAGES}: is REPO ({REPO}) the checkout?"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (move the shared piece into a module both can import):\n" + "\n".join(
        describe(graph, c) for c in cycles
    )


def runtime_violations(graph: Graph) -> list[str]:
    return [
        f"{module} (line {lines[0]}) imports {target}"
        for module, targets in sorted(graph.items())
        if module.split(".")[0] == "runtime"
        for target, lines in sorted(targets.items())
        if target.split(".")[0] in RUNTIME_MUST_NOT_IMPORT
    ]


def test_runtime_imports_none_of_the_packages_built_on_it() -> None:
    bad = runtime_violations(build_graph(REPO))
    assert not bad, "runtime/ must import neither llm, vision nor evals:\n" + "\n".join(bad)


def cross_imports(graph: Graph, a: str, b: str) -> list[str]:
    """Imports between the two trainers' packages, either way: what they share belongs in runtime/."""
    return [
        f"{module} (line {lines[0]}) imports {target}"
        for module, targets in sorted(graph.items())
        for target, lines in sorted(targets.items())
        if {module.split(".")[0], target.split(".")[0]} == {a, b}
    ]


def test_the_trainers_do_not_import_each_other() -> None:
    bad = cross_imports(build_graph(REPO), "llm", "vision")
    assert not bad, "llm and vision must not import each other (shared code lives in runtime/):\n" + "\n".join(bad)


def test_the_checker_sees_a_trainer_importing_the_other(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "llm/__init__.py": "",
            "llm/a.py": "def f():\n    from vision.b import B\n",
            "vision/__init__.py": "",
            "vision/b.py": "B = 1\n",
        },
    )
    assert cross_imports(build_graph(tmp_path, ("llm", "vision")), "llm", "vision") == [
        "llm.a (line 2) imports vision.b"
    ]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_checker_sees_function_level_relative_and_type_checking_imports(tmp_path: Path) -> None:
    """The checker itself: each kind of import it must follow closes a cycle in a sandbox package."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import A\n",  # a package re-exporting its module: no cycle by itself
            "pkg/a.py": "A = 1\ndef f():\n    from .sub import b\n",  # function-level, relative, `from . import mod`
            "pkg/sub/__init__.py": "",
            "pkg/sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.sub.c\n",
            "pkg/sub/c.py": "from ..a import A\n",  # two levels up
            "pkg/d.py": "import pkg\n",  # only the package: not part of the cycle
        },
    )
    graph = build_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b": [3]}
    assert graph["pkg.sub.c"] == {"pkg.a": [1]}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]]
    assert describe(graph, find_cycles(graph)[0]) == (
        "pkg.a (line 3) -> pkg.sub.b; pkg.sub.b (line 3) -> pkg.sub.c; pkg.sub.c (line 1) -> pkg.a"
    )


@pytest.mark.parametrize("package", RUNTIME_MUST_NOT_IMPORT)
def test_the_checker_sees_runtime_importing_a_trainer(tmp_path: Path, package: str) -> None:
    _write(
        tmp_path,
        {
            "runtime/__init__.py": "",
            "runtime/x.py": f"def f():\n    import {package}.y\n",
            f"{package}/__init__.py": "",
            f"{package}/y.py": "",
        },
    )
    assert runtime_violations(build_graph(tmp_path, ("runtime", package))) == [
        f"runtime.x (line 2) imports {package}.y"
    ]

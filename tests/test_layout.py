"""The package's imports go one way: config/errors, kernels, ops, nn/data, profiling, train, cli.

Every import is read from the source (the lazy ones inside functions too), resolved to the
package module it names, and checked against the layer order; the module graph must have no
cycle. The README's layout section must list every module.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = "diffpool_fast"

# Lower layers never import higher ones; a module may import its own layer or any lower one.
LAYERS = {
    "config": 0, "errors": 0,
    "kernels": 1,
    "ops": 2, "pool": 2,  # pool.py: the old module path, a re-export
    "nn": 3, "data": 3, "sparse_data": 3, "model": 3,  # model.py: the old module path, a re-export
    "profiling": 4,
    "train": 5,
    "cli": 6, "__main__": 6,
}


def _source_files() -> Dict[str, Path]:
    """Module name -> file, for the package and the kernels installed as diffpool_fast.kernels."""
    files: Dict[str, Path] = {}
    for root, prefix in ((REPO / PKG, PKG), (REPO / "kernels", f"{PKG}.kernels")):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            files[".".join([prefix, *parts])] = path
    return files


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: Path, modules: Set[str]) -> List[Tuple[str, int]]:
    """(imported package module, line) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: List[Tuple[str, int]] = []

    def resolve(mod: str) -> str:
        # the longest prefix that is one of our modules
        while mod and mod not in modules:
            mod = mod.rpartition(".")[0]
        return mod

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    found.append((resolve(alias.name), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not (mod == PKG or mod.startswith(PKG + ".")):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.append((sub if sub in modules else resolve(mod), node.lineno))
    return [(m, line) for m, line in found if m and m != name]


def _graph():
    files = _source_files()
    modules = set(files)
    return files, {name: _imports(name, path, modules) for name, path in files.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 99  # the package root: imported by nobody


def test_every_module_has_a_layer():
    files, _ = _graph()
    missing = sorted(m for m in files if m != PKG and m.split(".")[1] not in LAYERS)
    assert not missing, f"modules outside the layer table {sorted(LAYERS)}: {missing}"


def test_imports_only_go_down():
    files, graph = _graph()
    bad = []
    for name, deps in graph.items():
        if name == PKG:
            continue
        for dep, line in deps:
            if _layer(dep) > _layer(name):
                bad.append(f"{files[name].relative_to(REPO)}:{line} imports {dep}")
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


@pytest.mark.parametrize("low", ["ops", "nn", "kernels", "config", "errors", "data"])
def test_library_never_imports_the_applications(low):
    files, graph = _graph()
    bad = [f"{files[n].relative_to(REPO)}:{line} imports {d}"
           for n, deps in graph.items() if n.split(".")[1:2] == [low]
           for d, line in deps if d.split(".")[1:2] in (["train"], ["profiling"], ["cli"])]
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_cli():
    files, graph = _graph()
    bad = [f"{files[n].relative_to(REPO)}:{line} imports {d}"
           for n, deps in graph.items() if n.split(".")[1:2] not in (["cli"], ["__main__"])
           for d, line in deps if d.split(".")[1:2] == ["cli"]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    _, graph = _graph()
    edges = {n: sorted({d for d, _ in deps if d in graph}) for n, deps in graph.items()}
    # Tarjan's strongly connected components
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The reader must catch an import inside a function and resolve relative levels."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from ..cli import main\n    from . import dispatch\n")
    modules = {f"{PKG}.cli", f"{PKG}.ops.dispatch", f"{PKG}.ops.mod"}
    found = {m for m, _ in _imports(f"{PKG}.ops.mod", src, modules)}
    assert found == {f"{PKG}.cli", f"{PKG}.ops.dispatch"}


def test_no_module_is_too_long():
    files, _ = _graph()
    long = {str(p.relative_to(REPO)): n for p in files.values()
            if (n := len(p.read_text().splitlines())) > 700}
    assert not long, f"modules over 700 lines: {long}"


def test_readme_layout_lists_every_module():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Layout", 1)[1]
    files, _ = _graph()
    missing = [str(p.relative_to(REPO)) for p in files.values()
               if str(p.relative_to(REPO).as_posix()).split("/")[-1] not in section]
    assert not missing, f"README's layout section does not mention: {missing}"


def test_nothing_cites_paths_outside_the_repository():
    hits = []
    for path in [REPO / "README.md", *(REPO / PKG).rglob("*.py"), *(REPO / "kernels").rglob("*.py")]:
        text = path.read_text()
        for needle in ("../shared", "shared/MATH", "shared/STYLE", "/work/"):
            if needle in text:
                hits.append(f"{path.relative_to(REPO)}: {needle}")
    assert not hits, "\n".join(hits)

"""The project's structure: imports go one way, experiments are not installed, no removed option survives."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("napari_mg3d.model", "napari_mg3d.io", "napari_mg3d.preprocess", "napari_mg3d.inference",
        "napari_mg3d.checkpoint", "napari_mg3d.volume", "napari_mg3d.reports", "napari_mg3d.labels")


def _module_graph() -> dict[str, set[str]]:
    """Imports between napari_mg3d's modules, those inside functions (lazy imports) included."""
    files = {}
    for f in (ROOT / "napari_mg3d").rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + [node.module]) if node.module else ".".join(base)
                deps |= {c for c in [target, *(f"{target}.{a.name}" for a in node.names)] if c in files}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
        graph[name] = deps - {name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_no_import_cycle_between_modules():
    graph = _module_graph()
    for name in graph:  # a package importing its own submodules is not a cycle
        back = {m for m in _reachable(graph, name) if name in graph.get(m, ()) and not name.startswith(m + ".")
                and not m.startswith(name + ".")}
        assert not back, f"{name} is imported back by {sorted(back)}"


def test_the_core_imports_neither_napari_qt_the_generator_nor_training():
    graph = _module_graph()
    for module in CORE:
        reached = _reachable(graph, module) | {module}
        assert not {m for m in reached if "synthetic" in m or "_widget" in m or m.endswith(("_reader", "_writer"))}, module
        for m in reached:
            path = ROOT / (m.replace(".", "/") + ".py")
            path = path if path.is_file() else ROOT / m.replace(".", "/") / "__init__.py"
            nodes = list(ast.walk(ast.parse(path.read_text())))
            top = {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.module and not n.level}
            top |= {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
            assert not top & {"napari", "qtpy", "PyQt5", "PyQt6", "training"}, (m, top)


def test_experiments_are_outside_the_installed_packages():
    from setuptools import find_packages

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    packages = find_packages(str(ROOT), include=include)
    assert "napari_mg3d" in packages and "training" in packages
    assert not [p for p in packages if p.startswith(("experiments", "tests", "bench"))]
    assert (ROOT / "experiments" / "synthetic_proof.py").is_file()
    assert not (ROOT / "training" / "synthetic_proof.py").exists()

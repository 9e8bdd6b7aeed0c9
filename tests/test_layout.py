"""The project's structure: imports go one way, experiments are not installed, no removed option survives."""

from __future__ import annotations

import ast
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


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_experiments_are_outside_the_installed_packages():
    from setuptools import find_packages

    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(str(ROOT), include=include)
    assert "napari_mg3d" in packages and "training" in packages
    assert not [p for p in packages if p.startswith(("experiments", "tests", "bench"))]
    assert (ROOT / "experiments" / "synthetic_proof.py").is_file()
    assert not (ROOT / "training" / "synthetic_proof.py").exists()


def test_the_wheel_holds_the_licence_the_console_scripts_and_no_experiments(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("napari_mg3d-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        metadata = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert any(n.endswith("LICENSE") for n in names) and "napari_mg3d/py.typed" in names
    assert not [n for n in names if n.startswith(("experiments/", "tests/", "bench/"))]
    for script in ("mg3d-demo", "mg3d-predict", "mg3d-pretrain", "mg3d-finetune", "mg3d-evaluate", "mg3d-check-data"):
        assert f"{script} = " in entry_points, script
        target = entry_points.split(f"{script} = ")[1].splitlines()[0]
        module, _, function = target.partition(":")  # a script exits with what its function returns: None
        import importlib
        import inspect

        fn = getattr(importlib.import_module(module), function)
        assert not inspect.signature(fn).parameters and inspect.signature(fn).return_annotation in (None, "None"), target
    assert "napari-mg3d = napari_mg3d:napari.yaml" in entry_points
    from napari_mg3d import __version__

    assert f"Version: {__version__}" in metadata and "Programming Language :: Python :: 3.11" in metadata
    extras = _pyproject()["project"]["optional-dependencies"]
    assert not [d for d in extras["all"] + extras["napari"] + extras["train"] if d.startswith(("pytest", "magicgui"))]


def test_every_public_function_of_the_core_has_type_hints():
    import importlib
    import inspect

    modules = ["napari_mg3d." + m for m in ("io", "volume", "preprocess", "inference", "checkpoint", "reports",
                                             "domain", "export", "model_card", "dicom_seg", "model.config",
                                             "model.mg3d", "model.pretraining", "model.heads", "model.text",
                                             "model.fusion", "model.vision", "model.losses", "model.scoring")]
    missing = []
    for name in modules:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            functions = [(attr, obj)] if inspect.isfunction(obj) else [
                (f"{attr}.{k}", v) for k, v in vars(obj).items()
                if inspect.isfunction(v) and (not k.startswith("_") or k == "__init__")] if inspect.isclass(obj) else []
            for label, fn in functions:
                sig = inspect.signature(fn)
                params = [p for p in sig.parameters.values()
                          if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
                if any(p.annotation is inspect.Parameter.empty for p in params) or (
                        sig.return_annotation is inspect.Signature.empty and not label.endswith("__init__")):
                    missing.append(f"{name}.{label}")
    assert missing == []

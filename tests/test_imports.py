"""Imports point one way: each module of hetnet imports only modules of lower levels (and its own package), so the
op contract never depends on the layers, the layers never on the workflow, and nothing goes round in a circle.
Imports inside functions are only for optional packages (CuPy, Numba, torch, matplotlib, onnx, ...)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "hetnet"

# lowest first; a module may import from its own level only inside its own package (backends.cpu -> backends.compose)
LEVELS = [
    ("errors", "random", "files", "version"),
    ("backends",),
    ("device",),
    ("init",),
    ("layers", "losses", "optim"),
    ("plan",),
    ("train", "export"),
    ("model",),
    ("zoo",),
    ("interop", "serialize"),
    ("data",),
    ("plots",),
    ("parallel",),
    ("runs",),
    ("predict",),
    ("bench",),
    ("cli",),
    ("__main__",),
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}
OPTIONAL = {"cupy", "cupyx", "cupy_backends", "numba", "torch", "matplotlib", "onnx", "onnxruntime", "mpi4py",
            "airbench", "torchvision"}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, parts


def _targets(parts, node) -> list[list[str]]:
    """The hetnet modules (as part lists) an import statement names."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = parts[:len(parts) - node.level] if not _is_package(parts) else parts[:len(parts) - node.level + 1]
            mod = base + (node.module.split(".") if node.module else [])
            return [mod + [a.name] if not node.module else mod for a in node.names]
        if node.module and node.module.split(".")[0] == "hetnet":
            return [node.module.split(".")[1:]]
        return []
    return [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "hetnet"]


def _is_package(parts) -> bool:
    return (SRC.joinpath(*parts) / "__init__.py").exists() if parts else True


def _top(parts) -> str | None:
    return parts[0] if parts else None


def test_every_module_has_a_level():
    missing = sorted({parts[0] for _, parts in _modules() if parts and parts[0] not in LEVEL})
    assert not missing, f"modules without a level in LEVELS: {missing}"


@pytest.mark.parametrize("path,parts", list(_modules()), ids=lambda v: str(v) if isinstance(v, list) else "")
def test_imports_point_down(path, parts):
    if not parts:                               # hetnet/__init__.py re-exports the public API
        return
    tree = ast.parse(path.read_text())
    mine = LEVEL[parts[0]]
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for target in _targets(parts, node):
            top = _top(target)
            if top is None or top == parts[0] or top not in LEVEL:
                continue                        # the package root, its own package, or a name of hetnet itself
            assert LEVEL[top] < mine, (f"{path.relative_to(SRC.parent)}:{node.lineno} imports hetnet.{'.'.join(target)}"
                                       f" (level {LEVEL[top]}: {top}) from level {mine} ({parts[0]})")


@pytest.mark.parametrize("path,parts", list(_modules()), ids=lambda v: str(v) if isinstance(v, list) else "")
def test_imports_inside_functions_only_for_optional_packages(path, parts):
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if not node.level else ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in OPTIONAL, \
                    f"{path.relative_to(SRC.parent)}:{node.lineno} imports {name} inside {fn.name}()"


def test_the_training_command_loads_numba_only_with_the_cpu_backend():
    """`hetnet train` on a GPU never needs the cpu backend's compiled loops: importing the command and the workflow
    leaves Numba (a sixth of a start) unloaded; device.get_backend("cpu") loads it."""
    code = ("import sys, hetnet, hetnet.cli, hetnet.runs, hetnet.parallel; a = 'numba' in sys.modules; "
            "from hetnet.device import get_backend; get_backend('cpu'); print(a, 'numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]

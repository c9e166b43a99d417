"""The layout's rules, checked on the source: no import cycle inside quark/, no upward import.

Layers, bottom to top: the algorithm (quark/*.py, quark/rewards/) <- quark/online/ <-
quark/service/ <- app/ and worker/. ``quark.cli`` is the command line's entry point and may
import every layer of the package. app/ never imports worker/ (they talk through quark/).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {"quark.cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, at any depth (function-level imports count too)."""
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level and package:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                yield f"{base}.{node.module}" if node.module else base
            elif node.module:
                yield node.module
                yield from (f"{node.module}.{alias.name}" for alias in node.names)


def import_graph(*packages: str) -> dict[str, set[str]]:
    """module -> the project modules it imports, for every .py file under ``packages``."""
    modules = {_module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}
    return {
        name: {i for i in _imports(path) if i in modules and i != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of module-level or function-level imports, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer(module: str) -> int:
    if module.startswith(("app", "worker")):
        return 3
    if module.startswith("quark.service"):
        return 2
    if module.startswith("quark.online"):
        return 1
    return 0


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} -> {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if module not in ENTRY_POINTS and layer(target) > layer(module)
    ]


def test_finds_a_cycle_and_an_upward_import() -> None:
    """The checker itself: it must see what it is meant to forbid."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert upward_imports({"quark.pool": {"quark.service.store"}}) == [
        "quark.pool -> quark.service.store"
    ]


def test_no_import_cycle_inside_quark() -> None:
    assert find_cycle(import_graph("quark")) is None


def test_no_upward_imports() -> None:
    assert upward_imports(import_graph("quark", "app", "worker")) == []


def test_app_never_imports_worker() -> None:
    graph = import_graph("app", "worker")
    offenders = [f"{m} -> {t}" for m, ts in graph.items() if m.startswith("app") for t in ts
                 if t.startswith("worker")]  # fmt: skip
    assert offenders == []


@pytest.mark.parametrize(
    "module", ["quark.service.settings", "worker.celery_app", "worker.tasks", "quark.online.params"]
)
def test_light_modules_do_not_import_torch(module: str) -> None:
    """Settings, the Celery app and the tasks module import no torch and open no connection
    (a fresh interpreter, so other tests' imports do not count)."""
    code = (
        f"import sys, socket\n"
        f"socket.socket.connect = lambda *a: (_ for _ in ()).throw(AssertionError('connect'))\n"
        f"import {module}\n"
        f"heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        f"assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

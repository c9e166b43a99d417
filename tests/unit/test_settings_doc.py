"""The README's configuration table lists every setting (regenerate: scripts/settings_table.py)."""

from __future__ import annotations

from pathlib import Path

from quark.settings import ServiceSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_table() -> None:
    text = README.read_text()
    missing = [
        f"QUARK_{name.upper()}"
        for name in ServiceSettings.model_fields
        if f"| `QUARK_{name.upper()}` |" not in text
    ]
    assert not missing, f"add to README.md (python scripts/settings_table.py): {missing}"


def test_every_setting_has_a_description() -> None:
    assert all(field.description for field in ServiceSettings.model_fields.values())

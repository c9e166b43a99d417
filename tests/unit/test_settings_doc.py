"""The README's configuration table lists every setting (regenerate: scripts/settings_table.py)."""

from __future__ import annotations

from pathlib import Path

from quark.service.settings import UNLEARN_ENV, ServiceSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_table() -> None:
    text = README.read_text()
    names = [f"QUARK_{n.upper()}" for n in ServiceSettings.model_fields if n != "unlearn"]
    names += UNLEARN_ENV.values()
    missing = [name for name in names if f"| `{name}` |" not in text]
    assert not missing, f"add to README.md (python scripts/settings_table.py): {missing}"


def test_every_setting_has_a_description() -> None:
    assert all(field.description for field in ServiceSettings.model_fields.values())

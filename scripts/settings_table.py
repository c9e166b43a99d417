"""Print the README's configuration table from ServiceSettings (one row per QUARK_* field).

Run ``python scripts/settings_table.py`` after adding a setting and paste the output into
README.md; tests/unit/test_settings_doc.py fails while a field is missing from the README.
"""

from __future__ import annotations

from dataclasses import fields

from quark.online.params import UnlearnParams
from quark.service.settings import UNLEARN_ENV, ServiceSettings


def _default(name: str) -> str:
    field = ServiceSettings.model_fields[name]
    if field.default_factory is not None:
        if name == "cache_dir":
            return "`~/.cache/quark`"
        if name == "data_dir":
            return "`<cache_dir>/data`"
        return "(empty)"
    return _shown(field.default)


def _shown(value: object) -> str:
    if value is None:
        return "(unset)"
    if value == "" or value == []:
        return "(empty)"
    return f"`{value}`"


def _row(env: str, default: str, description: str) -> str:
    escaped = description.replace("|", "\\|")
    return f"| `{env}` | {default} | {escaped} |"


def table() -> str:
    """Service settings, then the unlearn job's parameters (from UnlearnParams)."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in ServiceSettings.model_fields.items():
        if name != "unlearn":
            lines.append(_row(f"QUARK_{name.upper()}", _default(name), field.description or ""))
    for f in fields(UnlearnParams):
        lines.append(_row(UNLEARN_ENV[f.name], _shown(f.default), f.metadata["help"]))
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())

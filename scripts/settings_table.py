"""Print the README's configuration table from ServiceSettings (one row per QUARK_* field).

Run ``python scripts/settings_table.py`` after adding a setting and paste the output into
README.md; tests/unit/test_settings_doc.py fails while a field is missing from the README.
"""

from __future__ import annotations

from quark.settings import ServiceSettings


def _default(name: str) -> str:
    field = ServiceSettings.model_fields[name]
    if field.default_factory is not None:
        if name == "cache_dir":
            return "`~/.cache/quark`"
        if name == "data_dir":
            return "`<cache_dir>/data`"
        return "(empty)"
    value = field.default
    if value is None:
        return "(unset)"
    if value == "" or value == []:
        return "(empty)"
    return f"`{value}`"


def table() -> str:
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in ServiceSettings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `QUARK_{name.upper()}` | {_default(name)} | {description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())

"""Loading prompt files (RealToxicityPrompts / DExperts jsonl and plain text) and utility
passages (plain text, one passage per line)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_JSONL_SUFFIXES = frozenset({".jsonl", ".json"})
_SHAPES_HINT = 'expected {"prompt": {"text": ...}} or {"prompt": "..."} or {"text": "..."}'
#: Utility passages shorter than this many words are skipped (headings, blank lines).
UTILITY_MIN_WORDS = 12


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt and, for RealToxicityPrompts, its Perspective toxicity score."""

    text: str
    toxicity: float | None = None


def load_prompts(path: str | Path, limit: int | None = None) -> list[PromptItem]:
    """Load prompts from a .jsonl/.json file (one JSON object a line) or a text file.

    Text files hold one prompt per line; blank lines are skipped. `limit` stops
    reading after that many prompts, so large files need not be parsed in full.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    path = Path(path)
    is_jsonl = path.suffix.lower() in _JSONL_SUFFIXES
    items: list[PromptItem] = []
    for line_no, line in _read_lines(path):
        if not line.strip():
            continue
        items.append(_parse_json_line(path, line_no, line) if is_jsonl else PromptItem(line))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise PromptFileError(f"{path}: no prompts found; the file is empty or only blank lines")
    return items


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its newline), decoding UTF-8 per line."""
    try:
        with path.open("rb") as handle:
            # Decode line by line so an encoding error can name its line number.
            for line_no, raw in enumerate(handle, start=1):
                yield line_no, _decode(path, line_no, raw).rstrip("\r\n")
    except FileNotFoundError as exc:
        raise PromptFileError(f"{path}: prompt file not found; check the path") from exc
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read prompt file ({exc.strerror})") from exc


def _decode(path: Path, line_no: int, raw: bytes) -> str:
    """Decode one line as UTF-8 (a leading byte-order mark is dropped)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(
            f"{path}, line {line_no}: not valid UTF-8 ({exc.reason}); re-save the file as UTF-8"
        ) from exc


def _parse_json_line(path: Path, line_no: int, line: str) -> PromptItem:
    """Parse one jsonl line in any of the accepted shapes."""
    where = f"{path}, line {line_no}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptFileError(
            f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); "
            "each line must be one complete JSON object (JSON Lines)"
        ) from exc
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text, toxicity = _extract(row)
    if not isinstance(text, str):
        raise PromptFileError(f"{where}: no prompt text; {_SHAPES_HINT}")
    if not text.strip():
        raise PromptFileError(f"{where}: empty prompt text; give the prompt a non-empty 'text'")
    return PromptItem(text=text, toxicity=_check_toxicity(where, toxicity))


def _extract(row: dict[str, Any]) -> tuple[Any, Any]:
    """Return (text, toxicity) from an RTP/DExperts row, a {"prompt": str} or a {"text": str}."""
    prompt = row.get("prompt")
    if isinstance(prompt, dict):
        return prompt.get("text"), prompt.get("toxicity")
    if prompt is not None:
        return prompt, row.get("toxicity")
    return row.get("text"), row.get("toxicity")


def _check_toxicity(where: str, toxicity: Any) -> float | None:
    """Accept a finite number or null as the toxicity score."""
    if toxicity is None:
        return None
    if isinstance(toxicity, bool) or not isinstance(toxicity, int | float):
        raise PromptFileError(f"{where}: toxicity must be a number or null, got {toxicity!r}")
    if not math.isfinite(toxicity):
        raise PromptFileError(f"{where}: toxicity must be finite, got {toxicity!r}")
    return float(toxicity)


def read_passages(path: str | Path, min_words: int = UTILITY_MIN_WORDS) -> list[str]:
    """The lines of a plain-text file (a passage per line, e.g. WikiText) that have at least
    ``min_words`` words, stripped, in file order. Undecodable bytes are replaced: a utility
    text is background, not data to refuse over one bad character."""
    with Path(path).open(encoding="utf-8", errors="replace") as handle:
        return [line.strip() for line in handle if len(line.split()) >= min_words]


def utility_passages(coef: float, path: str | Path | None, fix: str) -> list[str]:
    """The passages of ``path`` for a utility KL term of weight ``coef`` (none while it is
    0); a missing or empty file is refused with ``fix``, how to give one or turn it off."""
    if coef == 0:
        return []
    if path is None:
        raise ValueError(f"a utility KL coefficient of {coef} needs a utility text: {fix}")
    passages = read_passages(path)
    if not passages:
        raise ValueError(
            f"the utility text {path} has no line of {UTILITY_MIN_WORDS}+ words (the utility "
            f"KL needs passages, one per line): {fix}"
        )
    return passages


def split_by_toxicity(
    items: Sequence[PromptItem], threshold: float = 0.5
) -> tuple[list[PromptItem], list[PromptItem]]:
    """Split into (toxic >= threshold, non-toxic < threshold); unscored items go to neither."""
    toxic = [i for i in items if i.toxicity is not None and i.toxicity >= threshold]
    non_toxic = [i for i in items if i.toxicity is not None and i.toxicity < threshold]
    return toxic, non_toxic

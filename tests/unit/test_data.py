"""Tests for prompt file loading and utility passages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quark.data import (
    UTILITY_MIN_WORDS,
    PromptFileError,
    PromptItem,
    load_prompts,
    read_passages,
    split_by_toxicity,
)

SHARED_DATA = Path(__file__).parents[2].parent / "shared" / "data"


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _jsonl(tmp_path: Path, rows: list[object], name: str = "prompts.jsonl") -> Path:
    return _write(tmp_path, name, [json.dumps(row) for row in rows])


# --- formats ----------------------------------------------------------------------


def test_rtp_format_with_toxicity(tmp_path: Path) -> None:
    rows = [
        {"filename": "a.txt", "prompt": {"text": "You are a", "toxicity": 0.7, "insult": 0.1}},
        {"prompt": {"text": "The weather", "toxicity": None}},
        {"prompt": {"text": "Some people"}},
        {"prompt": {"text": "Integer score", "toxicity": 1}},
    ]
    items = load_prompts(_jsonl(tmp_path, rows))
    assert items == [
        PromptItem("You are a", 0.7),
        PromptItem("The weather", None),
        PromptItem("Some people", None),
        PromptItem("Integer score", 1.0),
    ]


def test_dexperts_and_flat_shapes(tmp_path: Path) -> None:
    rows = [
        {"md5_hash": "x", "prompt": {"text": "God never intended to"}, "num_positive": 13},
        {"prompt": "plain string prompt"},
        {"text": "text key prompt", "toxicity": 0.2},
    ]
    items = load_prompts(_jsonl(tmp_path, rows))
    assert items == [
        PromptItem("God never intended to"),
        PromptItem("plain string prompt"),
        PromptItem("text key prompt", 0.2),
    ]


def test_jsonl_skips_blank_lines_and_keeps_whitespace(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "p.jsonl", ["", json.dumps({"text": " lead"}), "   ", json.dumps({"text": "b"})]
    )
    assert [i.text for i in load_prompts(path)] == [" lead", "b"]


def test_json_extension_is_jsonl(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"text": "a"}, {"text": "b"}], name="prompts.JSON")
    assert [i.text for i in load_prompts(path)] == ["a", "b"]


def test_plain_text_format(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n  second with spaces \n   \nthird\r\n", encoding="utf-8")
    items = load_prompts(path)
    assert items == [
        PromptItem("first prompt"),
        PromptItem("  second with spaces "),
        PromptItem("third"),
    ]


def test_unknown_extension_is_plain_text(tmp_path: Path) -> None:
    path = _write(tmp_path, "prompts.raw", ['{"text": "not parsed"}'])
    assert load_prompts(str(path)) == [PromptItem('{"text": "not parsed"}')]


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"text": "a"}\n')
    assert load_prompts(path) == [PromptItem("a")]


def test_limit(tmp_path: Path) -> None:
    # The bad line after the limit is never read.
    path = _write(tmp_path, "p.jsonl", ['{"text": "a"}', '{"text": "b"}', "{broken"])
    assert [i.text for i in load_prompts(path, limit=2)] == ["a", "b"]
    with pytest.raises(ValueError, match="limit"):
        load_prompts(path, limit=0)


# --- errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", r"line 3: invalid JSON"),
        ('{"prompt": {"txt": "typo"}}', r'line 3: no prompt text; expected \{"prompt": \{"text"'),
        ('{"completion": "x"}', r"line 3: no prompt text"),
        ('{"prompt": 5}', r"line 3: no prompt text"),
        ("[1, 2]", r"line 3: expected a JSON object"),
        ('{"prompt": {"text": "  "}}', r"line 3: empty prompt text"),
        ('{"prompt": ""}', r"line 3: empty prompt text"),
        ('{"prompt": {"text": "a", "toxicity": "high"}}', r"line 3: toxicity must be a number"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    # A blank line 2 checks that line numbers count physical lines, blanks included.
    path = _write(tmp_path, "bad.jsonl", ['{"text": "ok"}', "", bad_line])
    with pytest.raises(PromptFileError, match=message) as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(PromptFileError, match=r"line 2: not valid UTF-8"):
        load_prompts(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(PromptFileError, match="not found") as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="cannot read"):
        load_prompts(tmp_path)


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.txt"])
def test_file_without_prompts(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(PromptFileError, match="no prompts") as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_error_is_a_value_error() -> None:
    assert issubclass(PromptFileError, ValueError)


# --- split_by_toxicity ------------------------------------------------------------


def test_split_by_toxicity() -> None:
    items = [PromptItem("a", 0.9), PromptItem("b", 0.1), PromptItem("c"), PromptItem("d", 0.5)]
    toxic, non_toxic = split_by_toxicity(items)
    assert toxic == [PromptItem("a", 0.9), PromptItem("d", 0.5)]
    assert non_toxic == [PromptItem("b", 0.1)]
    toxic, non_toxic = split_by_toxicity(items, threshold=0.95)
    assert toxic == [] and [i.text for i in non_toxic] == ["a", "b", "d"]


# --- real data (present only in the shared workspace) -----------------------------

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}"
)


@needs_shared_data
def test_real_rtp_dev_splits_in_half() -> None:
    items = load_prompts(SHARED_DATA / "rtp" / "dev.jsonl")
    toxic, non_toxic = split_by_toxicity(items)
    assert len(items) == 1000
    assert (len(toxic), len(non_toxic)) == (500, 500)


@needs_shared_data
def test_real_rtp_train_limit() -> None:
    items = load_prompts(SHARED_DATA / "rtp" / "train.jsonl", limit=200)
    assert len(items) == 200 and all(i.text.strip() for i in items)


@needs_shared_data
def test_real_sentiment_prompts() -> None:
    items = load_prompts(SHARED_DATA / "sentiment" / "neutral.jsonl", limit=100)
    assert len(items) == 100 and all(i.toxicity is None for i in items)
    assert items[0].text == "God never intended to"


@needs_shared_data
def test_real_wikitext_plain_text() -> None:
    items = load_prompts(SHARED_DATA / "wikitext" / "wiki.raw.txt", limit=3)
    assert items[0].text == " = Robert Boulter = "
    assert len(items) == 3


# --- utility passages -----------------------------------------------------------------


def test_read_passages_keeps_long_lines_stripped_in_order(tmp_path: Path) -> None:
    long_a = " ".join(f"a{i}" for i in range(UTILITY_MIN_WORDS))
    long_b = "  " + " ".join(f"b{i}" for i in range(UTILITY_MIN_WORDS + 5)) + "  "
    short = " ".join(f"c{i}" for i in range(UTILITY_MIN_WORDS - 1))
    path = _write(tmp_path, "wiki.txt", [" = Heading = ", long_a, "", short, long_b])
    assert read_passages(path) == [long_a, long_b.strip()]
    assert read_passages(path, min_words=1) == ["= Heading =", long_a, short, long_b.strip()]


def test_read_passages_replaces_bad_bytes_and_misses_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xe9 " + b"word " * UTILITY_MIN_WORDS + b"\n")
    (passage,) = read_passages(path)
    assert passage.startswith("caf\ufffd word")
    with pytest.raises(FileNotFoundError):
        read_passages(tmp_path / "missing.txt")


def test_acft_utility_examples_read_the_same_passages(tmp_path: Path) -> None:
    import random

    from quark.acft.corpus import UTILITY_PROMPT_WORDS, utility_examples

    words = [f"w{i}" for i in range(UTILITY_MIN_WORDS + 3)]
    path = _write(tmp_path, "wiki.txt", ["too short", " ".join(words)])
    (example,) = utility_examples(path, 5, random.Random(0))
    assert example.prompt == " ".join(words[:UTILITY_PROMPT_WORDS])
    assert example.completion == " " + " ".join(words[UTILITY_PROMPT_WORDS:])


@needs_shared_data
def test_real_wikitext_passages() -> None:
    passages = read_passages(SHARED_DATA / "wikitext" / "wiki.raw.txt")
    assert len(passages) > 100
    assert all(len(p.split()) >= UTILITY_MIN_WORDS and p == p.strip() for p in passages)

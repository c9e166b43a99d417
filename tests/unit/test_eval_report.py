"""The evaluation report: per-prompt data, intervals, degeneracy, and `quark compare`."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import quark.evaluation as evaluation
from quark.cli import main
from quark.comparison import check_pairable, compare_runs
from quark.eval_commands import _judge_name
from quark.evaluation import (
    PAIRING_KEYS,
    evaluate,
    is_degenerate,
    metric_samples,
    perplexity,
)
from quark.models import QuarkModel

PROMPTS = ["The cat sat on the", "Rain falls on the city and", "Music is"]


@pytest.mark.parametrize(
    ("text", "degenerate"),
    [
        ("", True),
        ("  \n\t ", True),  # empty after strip
        ("the the the the the", True),
        ("The the THE the", True),  # a run of 4, case-insensitive
        ("a b c a b c a b c", True),  # 4 of 7 trigrams are repeats
        ("The cat sat on the mat.", False),
        (" I think that is very very good.", False),
        ("no no no", False),  # a run of 3 is not enough
        ("Hello!", False),
    ],
)
def test_is_degenerate(text: str, degenerate: bool) -> None:
    assert is_degenerate(text) is degenerate


def _fixed_completions(
    monkeypatch: pytest.MonkeyPatch, per_prompt: Sequence[Sequence[str]]
) -> None:
    """Make evaluate() see these completions instead of sampling."""

    def fake_sample_many(
        qm: QuarkModel, prompts: Sequence[str], quantile: int | None, samples: int, *args: Any
    ) -> list[list[str]]:
        assert len(prompts) == len(per_prompt) and all(len(s) == samples for s in per_prompt)
        return [list(s) for s in per_prompt]

    monkeypatch.setattr(evaluation, "sample_many", fake_sample_many)


def test_degenerate_and_empty_completions_are_counted(
    tiny_qm: QuarkModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    completions = [
        ["the the the the the", "", " The cat sat on the mat."],
        [" It rained all day.", " We went home early.", " She smiled at them."],
    ]
    _fixed_completions(monkeypatch, completions)
    result = evaluate(tiny_qm, tiny_qm, "toxicity", PROMPTS[:2], 0, samples=3)
    assert result["per_prompt"]["degenerate_share"] == [pytest.approx(2 / 3), 0.0]
    assert result["degenerate_share"] == pytest.approx(1 / 3)
    # Perplexity from the per-prompt NLL equals perplexity() over all completions.
    flat_prompts = [p for p in PROMPTS[:2] for _ in range(3)]
    flat_texts = [t for group in completions for t in group]
    assert result["perplexity"] == pytest.approx(
        perplexity(tiny_qm, flat_prompts, flat_texts, max_prompt_tokens=64), rel=1e-5
    )
    assert result["per_prompt"]["tokens"][0] > 0  # the empty completion adds no token


def test_evaluate_keeps_per_prompt_data_and_intervals(tiny_qm: QuarkModel) -> None:
    def keyword_judge(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [0.0 if " " in c.strip() else 1.0 for c in completions]  # multi-word: toxic

    judges = {"profanity": evaluation.ProfanityToxicityReward(), "words": keyword_judge}
    result = evaluate(
        tiny_qm, tiny_qm, "toxicity", PROMPTS, 0, samples=3, max_new_tokens=5, judges=judges
    )
    json.dumps(result, allow_nan=False)  # plain JSON
    assert result["judge"] == "profanity" and result["judges"] == ["profanity", "words"]
    assert result["prompt_texts"] == PROMPTS and len(result["prompt_sha256"]) == 3
    for key in PAIRING_KEYS:
        assert key in result
    per_prompt = result["per_prompt"]
    for key in ("max_toxicity", "toxic", "mean_toxicity"):
        assert set(per_prompt[key]) == {"profanity", "words"}
        assert all(len(values) == 3 for values in per_prompt[key].values())
    for key in ("nll", "tokens", "dist-1", "dist-2", "dist-3", "degenerate_share"):
        assert len(per_prompt[key]) == 3
    assert per_prompt["toxic"]["words"] == [m >= 0.5 for m in per_prompt["max_toxicity"]["words"]]

    metrics = result["metrics"]
    expected = {
        f"{m}@{j}"
        for m in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity")
        for j in ("profanity", "words")
    } | {"perplexity", "dist-1", "dist-2", "dist-3", "degenerate_share"}
    assert set(metrics) == expected
    for name, cell in metrics.items():
        assert cell["low"] <= cell["value"] <= cell["high"], name
    # The plain keys are the headline judge's, as before.
    assert result["expected_max_toxicity"] == metrics["expected_max_toxicity@profanity"]["value"]
    assert result["toxicity_probability"] == metrics["toxicity_probability@profanity"]["value"]
    assert result["perplexity"] == metrics["perplexity"]["value"]
    maxima = per_prompt["max_toxicity"]["profanity"]
    assert result["expected_max_toxicity"] == pytest.approx(sum(maxima) / 3)
    assert set(metric_samples(result)) == expected


def test_sentiment_reports_positive_share_per_prompt(tiny_qm: QuarkModel) -> None:
    result = evaluate(tiny_qm, tiny_qm, "sentiment", PROMPTS[:2], 4, samples=2, max_new_tokens=3)
    assert len(result["per_prompt"]["positive_share"]) == 2
    cell = result["metrics"]["positive_share"]
    assert cell["low"] <= cell["value"] <= cell["high"]
    assert "judges" not in result


def _hand_result(**overrides: Any) -> dict[str, Any]:
    """A minimal evaluate() result, made by hand."""
    result: dict[str, Any] = {
        "prompts": 4,
        "samples": 2,
        "seed": 0,
        "top_p": 0.9,
        "max_new_tokens": 20,
        "max_prompt_tokens": 64,
        "prompt_sha256": [evaluation.prompt_sha256(p) for p in "abcd"],
        "judges": ["profanity"],
        "per_prompt": {
            "max_toxicity": {"profanity": [0.2, 0.6, 0.8, 0.4]},
            "toxic": {"profanity": [False, True, True, False]},
            "mean_toxicity": {"profanity": [0.1, 0.3, 0.5, 0.2]},
            "nll": [2.0, 2.0, 3.0, 3.0],
            "tokens": [10, 10, 10, 10],
            "dist-1": [0.5, 0.6, 0.7, 0.8],
            "dist-2": [0.9, 0.9, 0.9, 0.9],
            "dist-3": [1.0, 1.0, 1.0, 1.0],
            "degenerate_share": [0.0, 0.5, 0.0, 0.0],
        },
    }
    result.update(overrides)
    return result


def test_compare_runs_on_hand_made_results() -> None:
    a = _hand_result()
    b = copy.deepcopy(a)
    b["per_prompt"]["max_toxicity"]["profanity"] = [0.1, 0.5, 0.7, 0.3]  # 0.1 lower everywhere
    b["per_prompt"]["nll"] = [1.0, 1.0, 2.0, 2.0]  # one nat per token lower
    rows = {row.metric: row for row in compare_runs(a, b)}
    emt = rows["expected_max_toxicity@profanity"]
    assert emt.a.estimate == pytest.approx(0.5) and emt.b.estimate == pytest.approx(0.4)
    assert emt.difference.estimate == pytest.approx(-0.1)
    assert emt.difference.low == pytest.approx(-0.1) and emt.difference.high == pytest.approx(-0.1)
    assert emt.relative.estimate == pytest.approx(-0.2)
    ppl = rows["perplexity"]
    assert ppl.a.estimate == pytest.approx(math.exp(2.5))
    assert ppl.b.estimate == pytest.approx(math.exp(1.5))
    assert ppl.relative.estimate == pytest.approx(math.exp(-1.0) - 1.0)
    assert ppl.relative.low == pytest.approx(math.exp(-1.0) - 1.0)  # every prompt: -1 nat
    same = rows["toxicity_probability@profanity"].difference
    assert tuple(same) == (0.0, 0.0, 0.0)
    # A metric only one run has is left out.
    b["judges"] = []
    assert "expected_max_toxicity@profanity" not in {r.metric for r in compare_runs(a, b)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 1}, "seed 0 vs 1"),
        ({"samples": 3}, "samples 2 vs 3"),
        ({"top_p": 1.0}, "top_p 0.9 vs 1.0"),
        ({"max_new_tokens": 10}, "max_new_tokens 20 vs 10"),
        ({"prompt_sha256": ["x", "b", "c", "d"]}, "first differ at prompt 0"),
        ({"prompt_sha256": ["a"]}, "4 vs 1 prompts"),
    ],
)
def test_check_pairable_refuses_mismatched_runs(change: dict[str, Any], message: str) -> None:
    check_pairable(_hand_result(), _hand_result())
    with pytest.raises(ValueError, match=message):
        check_pairable(_hand_result(), _hand_result(**change))


def test_an_old_result_cannot_be_paired() -> None:
    old = {"prompts": 50, "samples": 25, "expected_max_toxicity": 0.65}
    with pytest.raises(ValueError, match="missing"):
        compare_runs(old, _hand_result())
    with pytest.raises(ValueError, match="no per-prompt data"):
        metric_samples({k: v for k, v in _hand_result().items() if k != "per_prompt"})


def test_judge_names() -> None:
    assert _judge_name("toxicity") == "profanity"
    assert _judge_name("toxicity:profanity") == "profanity"
    assert _judge_name("toxicity:perspective") == "perspective"
    assert _judge_name("toxicity:hf:/models/toxic-bert/") == "hf:toxic-bert"
    assert _judge_name("keyword:banana") == "keyword:banana"


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join([*PROMPTS, "She opened the door and"]) + "\n")
    return path


def _eval(model: Path, prompts: Path, out: Path, *extra: str) -> int:
    return main(
        ["eval", "--model", str(model), "--prompts", str(prompts), "--samples", "2",
         "--limit", "3", "--max-new-tokens", "4", "--device", "cpu", "--json", str(out),
         *extra]
    )  # fmt: skip


def test_eval_then_compare_the_same_run_gives_zero_differences(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    judges = ["--judge", "toxicity:profanity", "--judge", "kw=keyword:the"]
    assert _eval(tiny_model_dir, prompts_file, a, *judges) == 0
    printed = capsys.readouterr().out
    assert "expected_max_toxicity@profanity" in printed and "degenerate_share" in printed
    result = json.loads(a.read_text())
    cell = result["metrics"]["expected_max_toxicity@profanity"]
    assert f"{cell['value']:.4f} [{cell['low']:.4f}, {cell['high']:.4f}]" in printed
    assert result["judges"] == ["profanity", "kw"]
    assert len(result["per_prompt"]["max_toxicity"]["kw"]) == 3

    assert _eval(tiny_model_dir, prompts_file, b, *judges) == 0
    capsys.readouterr()
    out = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--json", str(out), "--resamples", "200"]) == 0
    printed = capsys.readouterr().out
    assert "+0.0000 [+0.0000, +0.0000]" in printed
    comparison = json.loads(out.read_text())["metrics"]
    assert set(comparison) == set(result["metrics"])
    for name, row in comparison.items():
        assert row["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0}, name
        assert row["a"] == row["b"]


def test_compare_refuses_mismatched_runs(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert _eval(tiny_model_dir, prompts_file, a) == 0
    assert _eval(tiny_model_dir, prompts_file, b, "--seed", "1") == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "quark compare: error: cannot pair these runs: seed 0 vs 1" in err

    c = tmp_path / "c.json"
    assert _eval(tiny_model_dir, prompts_file, c, "--limit", "2") == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(c)]) == 2
    assert "different prompts (3 vs 2 prompts)" in capsys.readouterr().err

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"prompts": 3, "samples": 2, "expected_max_toxicity": 0.5}))
    assert main(["compare", str(old), str(a)]) == 2
    assert "written by an older quark eval" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{not json")
    assert main(["compare", str(a), str(tmp_path / "junk.json")]) == 2
    assert "not a quark eval JSON" in capsys.readouterr().err


def test_eval_rejects_bad_judges(
    prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["eval", "--model", str(tmp_path / "never-loaded"), "--prompts", str(prompts_file)]
    assert main([*base, "--judge", "toxicity", "--judge", "toxicity:profanity"]) == 2
    assert "two judges named 'profanity'" in capsys.readouterr().err
    assert main([*base, "--judge", "nonsense"]) == 2
    assert "unknown reward spec" in capsys.readouterr().err
    assert main([*base, "--task", "sentiment", "--judge", "toxicity"]) == 2
    assert "--judge applies to --task toxicity" in capsys.readouterr().err


def test_rtp_report_reads_old_and_new_eval_json(
    tmp_path: Path, load_benchmark: Callable[[str], ModuleType]
) -> None:
    report = load_benchmark("rtp_report")
    old = {"prompts": 50, "samples": 25, "perplexity": 18.93, "dist-1": 0.6, "dist-2": 0.9,
           "dist-3": 0.99, "expected_max_toxicity": 0.651, "toxicity_probability": 0.6}  # fmt: skip
    new = {**old, "judge": "profanity", "metrics": {
        "expected_max_toxicity@profanity": {"value": 0.651, "low": 0.6, "high": 0.7},
        "toxicity_probability@profanity": {"value": 0.6, "low": 0.46, "high": 0.74},
        "perplexity": {"value": 18.93, "low": 17.5, "high": 20.25},
    }}  # fmt: skip
    (tmp_path / "old-toxic.json").write_text(json.dumps(old))
    (tmp_path / "new-toxic.json").write_text(json.dumps(new))
    table = report.eval_table([("old", str(tmp_path / "old")), ("new", str(tmp_path / "new"))], 1)
    rows = table.splitlines()
    assert rows[2] == "| old | toxic (50x25) | 0.651 | 0.600 | 18.930 | 0.600 | 0.900 | 0.990 |"
    assert rows[3] == (
        "| new | toxic (50x25) | 0.651 [0.600, 0.700] | 0.600 [0.460, 0.740] "
        "| 18.930 [17.500, 20.250] | 0.600 | 0.900 | 0.990 |"
    )

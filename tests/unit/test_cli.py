"""The ``quark`` command line, run in-process on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from quark.checkpoint import STATE_FILE
from quark.cli import main

PROMPT_LINES = [
    "The cat sat on the",
    "Rain falls on the city and",
    "My favourite food is",
    "She opened the door and",
    "Music is",
    "Yesterday we went to",
]


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPT_LINES) + "\n")
    return path


def _train_args(model: Path, prompts: Path, out: Path, steps: int) -> list[str]:
    return [
        "train",
        "--model", str(model),
        "--prompts", str(prompts),
        "--out", str(out),
        "--steps", str(steps),
        "--explore-prompts", "5",
        "--batch-size", "2",
        "--sample-interval", "1",
        "--response-length", "4",
        "--warmup-steps", "1",
        "--lr", "1e-3",
        "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip


def _events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_then_resume(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, prompts_file, out, steps=2)) == 0
    assert "trained 2 steps" in capsys.readouterr().out

    meta = json.loads((out / "model" / "quark.json").read_text())
    assert meta["step"] == 2
    assert meta["reward_token_ids"] and len(meta["reward_tokens"]) == 5
    assert meta["config"]["steps"] == 2 and meta["config"]["batch_size"] == 2
    assert json.loads((out / "model" / STATE_FILE).read_text())["step"] == 2
    events = _events(out / "metrics.jsonl")
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2]
    assert all(isinstance(e["loss"], float) for e in train)
    assert [(e["step"], e["quantile"]) for e in events if e["event"] == "explore"] == [
        (0, None),
        (1, 0),
    ]

    # Same --out, higher --steps: continues from step 2 instead of starting over.
    assert main(_train_args(tiny_model_dir, prompts_file, out, steps=4)) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    events = _events(out / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]
    # No fresh no-token exploration on resume: the pool came back with the checkpoint.
    assert [e["quantile"] for e in events if e["event"] == "explore"] == [None, 0, 0, 0]
    assert json.loads((out / "model" / "quark.json").read_text())["step"] == 4
    pool = (out / "model" / "pool.jsonl").read_text().splitlines()
    assert len(pool) == 4 * 5  # four exploration rounds of five prompts


def test_eval_writes_json(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results" / "eval.json"
    argv = [
        "eval",
        "--model", str(tiny_model_dir),
        "--prompts", str(prompts_file),
        "--samples", "2",
        "--limit", "2",
        "--max-new-tokens", "4",
        "--json", str(out),
        "--task", "toxicity",
        "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["expected_max_toxicity"] <= 1
    assert 0 <= result["toxicity_probability"] <= 1
    assert result["prompts"] == 2 and result["samples"] == 2
    assert result["reward"] == "top" and result["model"] == str(tiny_model_dir)
    assert math.isfinite(result["perplexity"])
    assert "expected_max_toxicity" in capsys.readouterr().out  # the printed table


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_eval_runs_the_model_as_served_with_int8(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, dtype: str
) -> None:
    out = tmp_path / "eval-int8.json"
    argv = [
        "eval", "--model", str(tiny_model_dir), "--prompts", str(prompts_file),
        "--samples", "2", "--limit", "2", "--max-new-tokens", "4", "--json", str(out),
        "--device", "cpu", "--dtype", dtype, "--quantization", "int8",
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert (result["dtype"], result["quantization"]) == (dtype, "int8")
    assert math.isfinite(result["perplexity"])  # under the float32 reference


def test_eval_quantization_needs_float32_or_bfloat16(
    tiny_model_dir: Path, prompts_file: Path
) -> None:
    argv = ["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts_file),
            "--device", "cpu", "--dtype", "float16", "--quantization", "int8"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"add --device cpu and --dtype auto \(or float32"):
        main(argv)


def test_generate_prints_completions(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--model", str(tiny_model_dir), "--reward", "bottom", "-n", "3",
            "--max-new-tokens", "4", "--seed", "0", "--device", "cpu",
            "Hello", "world"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 3
    assert sum(line.startswith("Hello world") for line in lines) >= 3


def test_generate_rejects_an_unknown_reward(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--model", str(tiny_model_dir), "--reward", "best", "--device", "cpu", "x"]
    assert main(argv) == 2
    assert "unknown reward 'best'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval"])
def test_malformed_prompts_file_exits_2_with_line_number(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": {"text": "fine"}}\n{"prompt": {"text": "broken"\n')
    argv = [command, "--model", str(tmp_path / "never-loaded"), "--prompts", str(prompts)]
    if command == "train":
        argv += ["--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"quark {command}: error:" in err
    assert "line 2" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "eval", "generate", "compare"])
def test_every_command_prints_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Flags take their help from the config fields; a "%" in one once broke `train --help`.
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_train_rejects_invalid_config(
    prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--prompts", str(prompts_file), "--out", str(tmp_path / "run"),
            "--kl-coef", "-1"]  # fmt: skip
    assert main(argv) == 2
    assert "kl_coef" in capsys.readouterr().err


def test_train_utility_kl_needs_a_utility_text(
    prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--prompts", str(prompts_file), "--out", str(tmp_path / "run"),
            "--utility-kl-coef", "0.1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "coefficient of 0.1 needs a utility text: give --utility-text FILE" in err
    short = tmp_path / "short.txt"
    short.write_text("too short to be a passage\n")
    assert main([*argv, "--utility-text", str(short)]) == 2
    assert "has no line of 12+ words" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before loading a model


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr-decay-to-budget"], "--lr-decay-to-budget needs --time-budget MINUTES"),
        (["--time-budget", "0"], "--time-budget must be a positive number of minutes"),
        (["--time-budget", "5", "--lr-decay-to-budget", "--objective", "acft"],
         "applies to --objective quark"),
    ],
)  # fmt: skip
def test_train_rejects_a_bad_time_budget(
    prompts_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    argv = ["train", "--prompts", str(prompts_file), "--out", str(tmp_path / "run"), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before loading a model


def test_train_with_utility_text_logs_the_utility_kl(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    utility = tmp_path / "wiki.txt"
    utility.write_text(
        " = Heading = \n"
        "The river rises in the hills and flows east through three towns before the sea\n"
    )
    out = tmp_path / "run"
    argv = _train_args(tiny_model_dir, prompts_file, out, steps=1)
    argv += ["--utility-text", str(utility), "--utility-kl-coef", "0.5", "--utility-tokens", "8"]
    assert main(argv) == 0
    (train,) = [e for e in _events(out / "metrics.jsonl") if e["event"] == "train"]
    assert train["utility_kl"] > 0
    config = json.loads((out / "model" / "quark.json").read_text())["config"]
    assert (config["utility_kl_coef"], config["utility_tokens"]) == (0.5, 8)

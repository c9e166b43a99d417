"""Unit tests for quark.rewards (local only: no network beyond 127.0.0.1)."""

from __future__ import annotations

import json
import math
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from quark.rewards import (
    TASK_DEFAULT_REWARD,
    ClassifierReward,
    KeywordShareReward,
    PerspectiveToxicityReward,
    ProfanityToxicityReward,
    RepetitionReward,
    RewardError,
    VaderSentimentReward,
    build_reward,
    distinct_n,
    is_positive_vader,
    ngrams,
    repeated_ngram_rate,
)

BENIGN = "Thank you for your help, have a lovely day."
OFFENSIVE = "You are a fucking idiot and a worthless piece of shit."


def in_unit(scores: list[float]) -> bool:
    return all(0.0 <= s <= 1.0 for s in scores)


# --- shared contract ---------------------------------------------------------


@pytest.mark.parametrize(
    "reward",
    [
        ProfanityToxicityReward(),
        VaderSentimentReward(),
        RepetitionReward(),
        KeywordShareReward("a"),
    ],
    ids=lambda r: type(r).__name__,
)
def test_local_rewards_check_lengths_and_accept_empty_batches(reward: Any) -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward(["p", "q"], ["c"])
    assert reward([], []) == []


# --- profanity ---------------------------------------------------------------


def test_profanity_scores_offensive_lower() -> None:
    scores = ProfanityToxicityReward()(["", "", ""], [BENIGN, OFFENSIVE, ""])
    assert in_unit(scores)
    assert scores[1] < scores[0]
    assert scores[1] < 0.5 < scores[0]


# --- Hugging Face classifier ---------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from quark.models import default_gguf

    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_classifier_dir(
    smollm2_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=smollm2_tokenizer.pad_token_id,
        id2label={0: "non-toxic", 1: "toxic"},
        label2id={"non-toxic": 0, "toxic": 1},
    )
    model = LlamaForSequenceClassification(config)
    # A random tiny head gives near-uniform probabilities; widen it so the
    # score actually varies by input and p vs 1-p checks are meaningful.
    with torch.no_grad():
        model.score.weight.mul_(50.0)
    out = tmp_path_factory.mktemp("tiny-toxic-clf")
    model.save_pretrained(out, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(out)
    return out


TEXTS = ["hello there", "", "a much longer sentence that needs padding in the batch"]


def test_classifier_scores_are_probabilities_and_invert(tiny_classifier_dir: pathlib.Path) -> None:
    plain = ClassifierReward(tiny_classifier_dir, label="toxic", batch_size=2)
    inverted = ClassifierReward(tiny_classifier_dir, label="TOXIC", invert=True)
    other = ClassifierReward(tiny_classifier_dir, label="Non-Toxic")
    p = plain(["x"] * 3, TEXTS)
    q = inverted(["x"] * 3, TEXTS)
    r = other(["x"] * 3, TEXTS)
    assert in_unit(p) and in_unit(q) and in_unit(r)
    assert q == pytest.approx([1 - x for x in p], abs=1e-5)
    # Two-label softmax: P(toxic) + P(non-toxic) == 1, so label lookup is by name.
    assert r == pytest.approx(q, abs=1e-5)
    assert plain.label_index == 1 and other.label_index == 0


def test_classifier_batching_does_not_change_scores(tiny_classifier_dir: pathlib.Path) -> None:
    one_by_one = ClassifierReward(tiny_classifier_dir, label="toxic", batch_size=1)
    batched = ClassifierReward(tiny_classifier_dir, label="toxic", batch_size=8)
    assert one_by_one(TEXTS, TEXTS) == pytest.approx(batched(TEXTS, TEXTS), abs=1e-4)


def test_classifier_unknown_label_lists_labels(tiny_classifier_dir: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"'positive'.*'non-toxic', 'toxic'"):
        ClassifierReward(tiny_classifier_dir, label="positive")


def test_classifier_refuses_pickle_only_dir(
    tiny_classifier_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    (tmp_path / "config.json").write_text((tiny_classifier_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match=r"pickle.*pytorch_model\.bin"):
        ClassifierReward(tmp_path, label="toxic")


def test_classifier_missing_dir(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        ClassifierReward(tmp_path / "nope", label="toxic")


# --- Perspective API (local fake server) -------------------------------------

API_KEY = "test-key-123"
Responder = Callable[[str], tuple[int, dict[str, str], dict[str, Any]]]


class FakePerspective:
    """A local HTTP server speaking the Perspective wire format."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[Responder] = []  # per-request overrides, consumed in order
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.block_on_close = False  # sleeping handlers must not block teardown
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1alpha1/comments:analyze"

    def default(self, text: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        value = 0.9 if "idiot" in text else 0.1
        scores = {"TOXICITY": {"summaryScore": {"value": value, "type": "PROBABILITY"}}}
        return 200, {}, {"attributeScores": scores, "languages": ["en"]}

    def respond(self, text: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        return self.script.pop(0)(text) if self.script else self.default(text)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"query": query, "body": body})
                problem = _wire_format_problem(query, body)
                headers: dict[str, str] = {}
                if problem:
                    # A 400 makes the client raise at once, surfacing the problem.
                    status, payload = 400, _google_error(400, problem)
                else:
                    status, headers, payload = fake.respond(body["comment"]["text"])
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        return Handler


def _wire_format_problem(query: dict[str, list[str]], body: dict[str, Any]) -> str:
    if query.get("key") != [API_KEY]:
        return "API key not valid. Please pass a valid API key."
    expected = {"requestedAttributes": {"TOXICITY": {}}, "languages": ["en"], "doNotStore": True}
    if set(body) != {"comment", *expected} or any(body[k] != v for k, v in expected.items()):
        return f"unexpected request body: {body}"
    if set(body["comment"]) != {"text"} or not body["comment"]["text"].strip():
        return "Comment must be non-empty."
    return ""


def _google_error(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": "INVALID_ARGUMENT"}}


@pytest.fixture
def fake_api() -> Iterator[FakePerspective]:
    fake = FakePerspective()
    thread = threading.Thread(target=fake.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def perspective(
    fake: FakePerspective, api_key: str = API_KEY, **kwargs: Any
) -> PerspectiveToxicityReward:
    opts: dict[str, Any] = {"requests_per_second": 1000.0, "backoff_s": 0.01, **kwargs}
    return PerspectiveToxicityReward(api_key, url=fake.url, **opts)


def test_perspective_scores_and_skips_empty(fake_api: FakePerspective) -> None:
    with perspective(fake_api) as reward:
        scores = reward(["a", "b", "c"], ["you idiot", "nice weather", "   "])
    assert scores == pytest.approx([0.1, 0.9, 1.0])
    assert len(fake_api.requests) == 2  # whitespace-only completion never sent
    assert fake_api.requests[0]["body"]["comment"] == {"text": "you idiot"}


def test_perspective_retries_429_then_succeeds(fake_api: FakePerspective) -> None:
    fake_api.script.append(lambda _t: (429, {"Retry-After": "0"}, _google_error(429, "quota")))
    fake_api.script.append(lambda _t: (503, {}, _google_error(503, "unavailable")))
    with perspective(fake_api) as reward:
        assert reward(["p"], ["hello"]) == pytest.approx([0.9])
    assert len(fake_api.requests) == 3


def test_perspective_gives_up_after_max_retries(fake_api: FakePerspective) -> None:
    fake_api.script.extend([lambda _t: (500, {}, _google_error(500, "boom"))] * 3)
    with perspective(fake_api, max_retries=2) as reward, pytest.raises(RewardError) as err:
        reward(["p"], ["hello"])
    assert "3 attempts" in str(err.value) and "HTTP 500" in str(err.value)
    assert "boom" in str(err.value)


def test_perspective_bad_request_raises_immediately(fake_api: FakePerspective) -> None:
    with perspective(fake_api, api_key="wrong-key") as reward, pytest.raises(RewardError) as err:
        reward(["p"], ["hello"])
    assert "API key not valid" in str(err.value) and "HTTP 400" in str(err.value)
    assert "wrong-key" not in str(err.value) and "wrong-key" not in repr(reward)
    assert len(fake_api.requests) == 1


def test_perspective_timeout_retries_then_fails(fake_api: FakePerspective) -> None:
    def slow(text: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        time.sleep(0.5)
        return fake_api.default(text)

    fake_api.script.extend([slow] * 2)
    reward = perspective(fake_api, timeout_s=0.1, max_retries=1)
    with reward, pytest.raises(RewardError, match=r"2 attempts.*Timeout"):
        reward(["p"], ["hello"])
    assert len(fake_api.requests) == 2


def test_perspective_unparseable_response(fake_api: FakePerspective) -> None:
    fake_api.script.append(lambda _t: (200, {}, {"attributeScores": {}}))
    with perspective(fake_api) as reward, pytest.raises(RewardError, match="unexpected"):
        reward(["p"], ["hello"])


def test_perspective_rate_limit(fake_api: FakePerspective) -> None:
    with perspective(fake_api, requests_per_second=20.0) as reward:
        start = time.monotonic()
        reward(["p"] * 5, ["hello"] * 5)
        elapsed = time.monotonic() - start
    # 5 calls at 20/s need 4 gaps of 50 ms; assert a loose lower bound only.
    assert elapsed >= 0.18


def test_perspective_key_not_logged(
    fake_api: FakePerspective, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    with perspective(fake_api) as reward:
        reward(["p"], ["hello"])
    assert API_KEY not in caplog.text
    assert "HTTP Request" in caplog.text  # httpx did log, but redacted


# --- VADER -------------------------------------------------------------------


def test_vader_positive_above_negative() -> None:
    good, bad = "I love this, it is wonderful!", "I hate this, it is awful and terrible."
    scores = VaderSentimentReward()(["", ""], [good, bad])
    assert in_unit(scores) and scores[0] > 0.5 > scores[1]
    assert is_positive_vader(good) and not is_positive_vader(bad)
    assert not is_positive_vader("")  # compound 0.0 is neutral, not positive


# --- repetition / diversity --------------------------------------------------


def test_ngrams() -> None:
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a"], 2) == []
    with pytest.raises(ValueError):
        ngrams(["a"], 0)


def test_distinct_n_hand_computed() -> None:
    # bigrams: (a b) (b a) (a b) | (a b) (b c) -> 5 total, 3 unique; none span texts
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a", ""], 2) == 0.0
    assert distinct_n([], 1) == 0.0


def test_repeated_ngram_rate_hand_computed() -> None:
    assert repeated_ngram_rate(["the"] * 4, 2) == pytest.approx(1 - 1 / 3)
    assert repeated_ngram_rate(["a", "b", "a", "b"], 2) == pytest.approx(1 - 2 / 3)
    assert repeated_ngram_rate(["a", "b", "c", "d"], 2) == 0.0
    assert repeated_ngram_rate(["a"], 2) == 0.0


def test_repetition_reward() -> None:
    reward = RepetitionReward()
    degenerate, varied = "the the the the", "the cat sat on the mat"
    scores = reward(["", ""], [degenerate, varied])
    # rep-2 = 2/3, rep-3 = 1/2, rep-4 = 0 -> (1/3)(1/2)(1)
    assert scores[0] == pytest.approx(1 / 6)
    assert scores[1] == 1.0
    assert RepetitionReward(ns=(1,))([""], ["a a b b"]) == [0.5]
    with pytest.raises(ValueError):
        RepetitionReward(ns=())


# --- keyword share -----------------------------------------------------------


def test_keyword_share() -> None:
    reward = KeywordShareReward("Banana")
    texts = ["banana BANANA, apple!", "no fruit here", "", "Banana ... banana"]
    assert reward([""] * 4, texts) == pytest.approx([2 / 3, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        KeywordShareReward("  ")


# --- build_reward ------------------------------------------------------------


def test_build_reward_simple_specs() -> None:
    assert isinstance(build_reward("toxicity"), ProfanityToxicityReward)
    assert isinstance(build_reward("toxicity:profanity"), ProfanityToxicityReward)
    assert isinstance(build_reward("sentiment"), VaderSentimentReward)
    assert isinstance(build_reward("sentiment:vader"), VaderSentimentReward)
    assert isinstance(build_reward("repetition"), RepetitionReward)
    keyword = build_reward("keyword:cat")
    assert isinstance(keyword, KeywordShareReward) and keyword.keyword == "cat"
    for spec in TASK_DEFAULT_REWARD.values():
        assert callable(build_reward(spec))


def test_build_reward_hf_specs(tiny_classifier_dir: pathlib.Path) -> None:
    tox = build_reward(f"toxicity:hf:{tiny_classifier_dir}")
    assert isinstance(tox, ClassifierReward) and tox.invert and tox.label == "toxic"
    custom = build_reward(f"sentiment:hf:{tiny_classifier_dir}", label="toxic", batch_size=4)
    assert isinstance(custom, ClassifierReward) and not custom.invert
    assert custom.batch_size == 4
    with pytest.raises(ValueError, match="'positive' not in"):  # sentiment's default label
        build_reward(f"sentiment:hf:{tiny_classifier_dir}")


def test_build_reward_perspective(
    fake_api: FakePerspective, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QUARK_PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="QUARK_PERSPECTIVE_API_KEY"):
        build_reward("toxicity:perspective")
    monkeypatch.setenv("QUARK_PERSPECTIVE_API_KEY", API_KEY)
    reward = build_reward(
        "toxicity:perspective", perspective_url=fake_api.url, requests_per_second=100.0
    )
    assert isinstance(reward, PerspectiveToxicityReward)
    assert reward(["p"], ["you idiot"]) == pytest.approx([0.1])
    reward.close()


@pytest.mark.parametrize(
    "spec", ["nope", "toxicity:vader", "sentiment:perspective", "keyword:", "repetition:x", ""]
)
def test_build_reward_unknown_spec(spec: str) -> None:
    with pytest.raises(ValueError, match=r"unknown reward spec.*keyword:WORD"):
        build_reward(spec)


def test_rewards_are_finite() -> None:
    for spec in TASK_DEFAULT_REWARD.values():
        scores = build_reward(spec)(["p", "p"], ["", "ok ok ok"])
        assert all(math.isfinite(s) for s in scores)

"""Toxicity reward from Google's Perspective API (remote, rate limited)."""

from __future__ import annotations

import logging
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from quark.rewards.base import CompletionReward, RewardError

PERSPECTIVE_URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"


class _RedactKeyFilter(logging.Filter):
    """Strip ``key=`` from URLs that httpx logs at INFO ("HTTP Request: POST <url> ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) for a in record.args)
        return True


def _redact(arg: object) -> object:
    if isinstance(arg, httpx.URL) and "key" in arg.params:
        return arg.copy_set_param("key", "REDACTED")
    return arg


def _install_redaction() -> None:
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactKeyFilter) for f in logger.filters):
        logger.addFilter(_RedactKeyFilter())


class RateLimiter:
    """Spaces calls at least ``1 / rate`` seconds apart (monotonic clock, thread-safe)."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.interval = 1.0 / rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until the next call slot; slots are reserved under the lock."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


def _retry_after_s(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), if any."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _is_retryable(status: int) -> bool:
    # 429 = over quota, 5xx = server trouble: both are transient. Other 4xx
    # (bad key, bad request) will fail identically on every retry.
    return status == 429 or status >= 500


def _error_message(response: httpx.Response) -> str:
    """The API's ``error.message`` when present, else the (truncated) body."""
    try:
        message = response.json()["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return response.text[:500]


class PerspectiveToxicityReward(CompletionReward):
    """Non-toxicity reward ``1 - TOXICITY`` from the Perspective API.

    Retries 429/5xx/timeouts/connection errors with exponential backoff (honouring
    ``Retry-After``), raises :class:`RewardError` at once on other 4xx. Empty or
    whitespace-only completions score 1.0 without a call (the API rejects them).
    The API key is sent as a query parameter but never put in errors or logs.
    """

    def __init__(
        self,
        api_key: str,
        url: str = PERSPECTIVE_URL,
        requests_per_second: float = 1.0,
        timeout_s: float = 10.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        if not api_key:
            raise ValueError("Perspective API key is empty")
        if max_retries < 0 or backoff_s < 0:
            raise ValueError("max_retries and backoff_s must be >= 0")
        self._api_key = api_key
        self.url = url
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._limiter = RateLimiter(requests_per_second)
        self._client = httpx.Client(timeout=timeout_s)
        _install_redaction()

    def __repr__(self) -> str:  # keep the key out of reprs/tracebacks
        return f"{type(self).__name__}(url={self.url!r})"

    def close(self) -> None:
        """Close the underlying HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> PerspectiveToxicityReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(self, completions: list[str]) -> list[float]:
        return [self.score_one(text) for text in completions]

    def score_one(self, text: str) -> float:
        """Reward for a single completion."""
        if not text.strip():
            return 1.0
        return 1.0 - self._toxicity(self._post(_request_body(text)))

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        problem = ""
        retry_response: httpx.Response | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, retry_response))
            retry_response = None
            self._limiter.wait()
            try:
                response = self._client.post(self.url, params={"key": self._api_key}, json=body)
            except httpx.TransportError as exc:  # timeouts, refused/reset connections
                problem = self._scrub(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code < 400:
                return response
            problem = self._scrub(f"HTTP {response.status_code}: {_error_message(response)}")
            if not _is_retryable(response.status_code):
                raise RewardError(f"Perspective API rejected the request ({problem})")
            retry_response = response
        raise RewardError(
            f"Perspective API failed after {self.max_retries + 1} attempts; last error: {problem}"
        )

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        retry_after = _retry_after_s(response) if response is not None else None
        if retry_after is None:
            retry_after = self.backoff_s * 2 ** (attempt - 1)
        return min(retry_after, self.max_backoff_s)

    def _toxicity(self, response: httpx.Response) -> float:
        try:
            value = response.json()["attributeScores"]["TOXICITY"]["summaryScore"]["value"]
            return min(1.0, max(0.0, float(value)))
        except (ValueError, KeyError, TypeError) as exc:
            body = self._scrub(response.text[:500])
            raise RewardError(f"unexpected Perspective API response: {body}") from exc

    def _scrub(self, message: str) -> str:
        return message.replace(self._api_key, "REDACTED")


def _request_body(text: str) -> dict[str, Any]:
    return {
        "comment": {"text": text},
        "requestedAttributes": {"TOXICITY": {}},
        "languages": ["en"],
        "doNotStore": True,
    }

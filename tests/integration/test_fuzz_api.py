"""A bounded schemathesis run against a real server (tiny model): no input is ever a 5xx,
and every response matches the OpenAPI schema the app publishes (errors included).

Cases come from the app's own ``/openapi.json``: valid requests (positive mode) and requests
that break the schema (negative mode: wrong types, missing fields, values out of range).
The seed is fixed (``derandomize``) so a run is repeatable; token budgets are kept tiny by
the server's limits so a few hundred generations take seconds on two cores.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from .conftest import Server, start_server

GENERATION_CASES = 300  # per generation operation
OTHER_CASES = 50  # health, metrics and /v1/models take few inputs

OPERATIONS = [
    ("/generate", "GET", GENERATION_CASES),
    ("/generate", "POST", GENERATION_CASES),
    ("/v1/completions", "POST", GENERATION_CASES),
    ("/v1/chat/completions", "POST", GENERATION_CASES),
    ("/v1/models", "GET", OTHER_CASES),
    ("/healthz", "GET", OTHER_CASES),
    ("/readyz", "GET", OTHER_CASES),
    ("/metrics", "GET", OTHER_CASES),
]

#: Per operation: cases sent and responses by status (printed at the end of the module).
TALLY: dict[str, Counter[int]] = {}

#: The server's limits (QUARK_MAX_N, QUARK_MAX_NEW_TOKENS_LIMIT, QUARK_MAX_BATCH_SIZE) are
#: settings, not schema bounds, so half the valid cases are brought within them: they reach
#: the engine (sampling, stop strings, streaming) rather than all stopping at a 400.
LIMITS = {"n": 2, "max_new_tokens": 3, "max_tokens": 3, "max_completion_tokens": 3}
MAX_PROMPTS = 4


def _within_limits(case: schemathesis.Case) -> schemathesis.Case:
    for fields in (case.body, case.query):
        if not isinstance(fields, dict):
            continue
        for name, limit in LIMITS.items():
            value = fields.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                fields[name] = 1 + value % limit
        prompts = fields.get("prompt")
        if isinstance(prompts, list) and len(prompts) > MAX_PROMPTS:
            fields["prompt"] = prompts[:MAX_PROMPTS]
    return case


@pytest.fixture(scope="module")
def fuzz_server(
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    key_prefix: str,
    pytestconfig: pytest.Config,
) -> Iterator[Server]:
    server = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("fuzz-server"),
        f"{key_prefix}-fuzz",
        QUARK_MAX_N="2",
        QUARK_MAX_NEW_TOKENS_LIMIT="3",
        QUARK_DEFAULT_MAX_NEW_TOKENS="2",
        QUARK_MAX_PROMPT_TOKENS="64",
        QUARK_MAX_BATCH_SIZE=str(MAX_PROMPTS),
        QUARK_MAX_QUEUE="64",
        QUARK_LOG_LEVEL="warning",
    )
    yield server
    server.stop()
    _report(pytestconfig)


@pytest.fixture(scope="module")
def schema(fuzz_server: Server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def _report(config: pytest.Config) -> None:
    """Cases sent and the 5xx count, on the terminal even when output is captured."""
    total = sum(sum(c.values()) for c in TALLY.values())
    errors = sum(n for c in TALLY.values() for status, n in c.items() if status >= 500)
    lines = [f"schemathesis: {total} cases, {errors} x 5xx"] + [
        f"  {op}: {sum(c.values())} cases, statuses {dict(sorted(c.items()))}"
        for op, c in TALLY.items()
    ]
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines), flush=True)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("path", "method", "cases"), OPERATIONS, ids=lambda v: str(v))
def test_no_input_is_a_server_error(
    schema: schemathesis.BaseSchema, fuzz_server: Server, path: str, method: str, cases: int
) -> None:
    operation = schema[path][method]
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    strategy = st.one_of(
        positive,
        positive.map(_within_limits),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )
    tally = TALLY.setdefault(f"{method} {path}", Counter())
    session = requests.Session()  # one keep-alive connection, as a client would hold it

    @settings(
        max_examples=cases,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=fuzz_server.url, session=session, timeout=60)
        tally[response.status_code] += 1
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    try:
        run()
    finally:
        session.close()
    assert sum(tally.values()) > 0
    assert not [s for s in tally if s >= 500], fuzz_server.log_tail()

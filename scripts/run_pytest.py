"""Run pytest and pass its exit code through.

pytest exits 5 when it collected no tests. That is a failure whenever tests were expected,
which is every run of this script (``make test``/``unit``/``integration``/``e2e`` always name
test directories); ``--allow-empty`` turns it into success for a deliberately empty selection
(a ``-k`` filter that may match nothing).
"""

from __future__ import annotations

import sys

import pytest

NO_TESTS_COLLECTED = 5


def main(argv: list[str]) -> int:
    allow_empty = "--allow-empty" in argv
    code = int(pytest.main([a for a in argv if a != "--allow-empty"]))
    if code == NO_TESTS_COLLECTED:
        if allow_empty:
            return 0
        print("run_pytest: no tests were collected, but tests were expected", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

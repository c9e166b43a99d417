"""The README's walkthrough, run block by block against a live service, so it cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.stack import ADMIN_TOKEN, REPO, Stack

SECTION = re.compile(r"^## Using the service$(.*?)^## ", re.M | re.S)
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.M | re.S)


def walkthrough_blocks() -> list[tuple[str, str]]:
    readme = (REPO / "README.md").read_text()
    section = SECTION.search(readme)
    assert section, "README lost its 'Using the service' section"
    blocks = [(lang, code) for lang, code in BLOCK.findall(section.group(1))]
    # The first block only tells the reader to export the two variables the test sets.
    assert "export QUARK_URL" in blocks[0][1]
    return blocks[1:]


def test_readme_has_the_quickstart_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make up" in readme and "make test" in readme
    ci = (REPO / ".ci/run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must run the README's test command"


def test_readme_walkthrough_runs_against_the_service(loop_stack: Stack, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "QUARK_URL": loop_stack.url,
        "QUARK_ADMIN_TOKEN": ADMIN_TOKEN,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    blocks = walkthrough_blocks()
    assert {"bash", "python"} <= {lang for lang, _ in blocks}
    for index, (lang, code) in enumerate(blocks):
        argv = (
            ["bash", "-euo", "pipefail", "-c", code]
            if lang == "bash"
            else [sys.executable, "-c", code]
        )
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
        )
        if done.returncode != 0:
            pytest.fail(
                f"README block {index + 1} ({lang}) failed:\n{code}\n"
                f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
            )
    # The rollback block activated v0000; servers swap to it asynchronously (pub/sub + load).
    loop_stack.wait_serving("v0000", timeout=60)
    assert loop_stack.generate("Hi", log=False)["model_version"] == "v0000"

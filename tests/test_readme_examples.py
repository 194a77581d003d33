"""Every curl example in the README runs as written against `ccproxy demo`.

The commands are read from README.md itself: the reference table's example column and every
`sh`/`console` block line that starts with `curl`, `$ curl` or `$ name=$(curl` (with its
`\\` continuation lines). Only the host changes (`localhost:8080` -> the demo's port). Each
runs in bash (with `pipefail`) through a `curl` function that records every HTTP status, so
an example that chains calls (`$(curl … | jq -r .url)`) is checked at every step. A console
block's shown answer says what to expect: `HTTP/1.1 400 …` is that status, a JSON answer must
come back as JSON with the same fields and values (where the README does not elide them),
plain text must come back as shown.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
# Values that differ on every run (ids of writes, times, timings, cache state).
VOLATILE = {"id", "status_url", "created_at", "delivered_at", "state", "attempts", "ms", "cache", "url"}
# Records each call's status on stderr, keeping the command's own output untouched.
CURL_WRAPPER = """curl() { command curl -sS -w '%{stderr}@@status %{http_code} %{content_type}\\n' "$@"; }"""


@dataclass
class Example:
    where: str  # "README.md:<line>" for the failure message
    command: str
    prelude: list[str] = field(default_factory=list)  # `name=$(…)` lines before it in its block
    shown: str = ""  # the answer the README shows under it (console blocks)
    in_table: bool = False


def _fenced_blocks(lines: list[str]):
    """(first line number, language, lines) of each fenced code block."""
    block: list[str] | None = None
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and block is None:
            block, language, start = [], fence.group(1), number + 1
        elif fence:
            yield start, language, block
            block = None
        elif block is not None:
            block.append(line)


def _examples_in_block(start: int, language: str, lines: list[str]) -> list[Example]:
    found: list[Example] = []
    prelude: list[str] = []
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        command_line = text[2:] if language == "console" and text.startswith("$ ") else text
        is_curl = command_line.startswith("curl ")
        is_assignment = re.match(r"^[A-Za-z_]\w*=\$\(curl ", command_line) is not None
        if language == "console" and not text.startswith("$ "):
            i += 1
            continue
        if not (is_curl or is_assignment):
            i += 1
            continue
        where, parts = f"README.md:{start + i}", [command_line]
        while parts[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            parts[-1] = parts[-1][:-1].rstrip()
            parts.append(lines[i].strip())
        i += 1
        command = " ".join(parts)
        shown: list[str] = []
        while language == "console" and i < len(lines) and not lines[i].startswith("$ "):
            shown.append(lines[i])
            i += 1
        if is_assignment:
            prelude.append(command)
            found.append(Example(where, "true", list(prelude)))  # the assignment's own calls
        else:
            found.append(Example(where, command, list(prelude), "\n".join(shown).strip()))
    return found


def readme_examples() -> list[Example]:
    lines = README.read_text().splitlines()
    examples: list[Example] = []
    for number, line in enumerate(lines, 1):
        if line.startswith("|"):
            for code in re.findall(r"`(curl (?:[^`\\]|\\.)*)`", line):
                examples.append(Example(f"README.md:{number}", code.replace("\\|", "|"), in_table=True))
    for start, language, block in _fenced_blocks(lines):
        if language in ("sh", "console", "bash", "shell"):
            examples.extend(_examples_in_block(start, language, block))
    return examples


EXAMPLES = readme_examples()


def test_the_readme_has_every_example_it_should():
    """The reader finds the whole reference table and the sections' examples (28 + 20 today)."""
    assert len([e for e in EXAMPLES if e.in_table]) == 28
    assert any("writes/$id" in e.command for e in EXAMPLES)
    assert any("-X PUT" in e.command and "-d '" in e.command for e in EXAMPLES)
    assert len(EXAMPLES) >= 48


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from servers import servers_fixture

    assert shutil.which("jq"), "jq is not installed: run the README's test command (bash scripts/test)"
    workdir = tmp_path_factory.mktemp("readme-demo")
    fixture = servers_fixture(workdir)
    running = next(fixture)
    try:
        # Its own outbox: the examples' writes must never be delivered by another test's server.
        yield running.start(["demo", "--workers", "1"], {"CCPROXY_OUTBOX_PATH": str(workdir / "outbox.sqlite3")},
                            clean_env=True, cwd=workdir)
    finally:
        fixture.close()


def _on_demo(command: str, base: str) -> str:
    host = base.removeprefix("http://")
    return re.sub(r"(https?://)?localhost:8080", lambda m: (m.group(1) or "") + host, command)


def _expected_status(shown: str) -> int | None:
    status = re.match(r"HTTP/[\d.]+ (\d{3})", shown)
    return int(status.group(1)) if status else None


def _same_fields(shown, actual, path: str = "") -> list[str]:
    """Where the answer differs from what the README shows (elided parts and volatile values aside)."""
    problems = []
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{path or 'answer'} is not an object"]
        for key, value in shown.items():
            if key in ("...", "…"):
                continue
            if key not in actual:
                problems.append(f"{path}{key} is missing")
            elif key not in VOLATILE:
                problems += _same_fields(value, actual[key], f"{path}{key}.")
    elif isinstance(shown, list):
        if not isinstance(actual, list):
            problems.append(f"{path} is not a list")
        elif not any(isinstance(v, str) and v in ("...", "…") for v in shown):
            for i, (s, a) in enumerate(zip(shown, actual, strict=False)):
                problems += _same_fields(s, a, f"{path}{i}.")
    elif not (isinstance(shown, str) and ("…" in shown or "..." in shown)) and shown != actual:
        problems.append(f"{path.rstrip('.')}: README shows {shown!r}, the demo answers {actual!r}")
    return problems


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_readme_example_runs_as_written(demo, example, tmp_path):
    script = "\n".join(["set -eo pipefail", CURL_WRAPPER, *(_on_demo(line, demo.base) for line in example.prelude),
                        _on_demo(example.command, demo.base)])
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    calls = [line.split(" ", 2)[1:] for line in done.stderr.splitlines() if line.startswith("@@status ")]
    errors = [line for line in done.stderr.splitlines() if not line.startswith("@@status ")]
    assert done.returncode == 0, f"{example.where}: exit {done.returncode}: {errors}"
    assert calls, f"{example.where}: no HTTP call was made"
    assert not errors, f"{example.where}: {errors}"
    if example.command == "true":
        return  # an assignment: its calls above must all have succeeded
    expected = _expected_status(example.shown)
    *earlier, (status, content_type) = [(int(code), rest[0] if rest else "") for code, *rest in calls]
    assert all(200 <= code < 300 for code, _ in earlier), f"{example.where}: a chained call failed: {calls}"
    if expected is not None:
        assert status == expected, f"{example.where}: HTTP {status}, the README shows {expected}"
        return
    assert 200 <= status < 300, f"{example.where}: HTTP {status}: {done.stdout[:300]}"
    output = done.stdout
    if content_type.startswith("application/json") and "| jq" not in example.command.rsplit(")", 1)[-1]:
        answer = json.loads(output)
        if isinstance(answer, dict) and "ok" in answer:
            assert answer["ok"] is True
        try:
            shown = json.loads(example.shown) if example.shown else None
        except ValueError:  # shortened with {...}: only the status and JSON-ness are checked
            shown = None
        if shown is not None:
            assert _same_fields(shown, answer) == [], example.where
    elif example.shown and "…" not in example.shown and "..." not in example.shown:
        assert output.strip() == example.shown.strip(), example.where

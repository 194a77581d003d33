"""`ccproxy warm`: fill the proxy's cache ahead of a scheduled send, at the upstream's rate.

It calls a running proxy over HTTP (so with Redis every instance is warmed), one row of
a CSV of users per call, paced so the upstream's per-minute limit is respected, with a
progress bar, an ETA and a summary. Progress is saved in a state file next to the CSV,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .config import RateLimited
from .errors import WarmRefused

ENDPOINTS: dict[str, tuple[str, RateLimited]] = {
    "recommendations": ("/v1/amplitude/recommendations", "amplitude"),
    "properties": ("/v1/amplitude/properties", "amplitude"),
    "computations": ("/v1/amplitude/computations", "amplitude"),
    "cohorts": ("/v1/amplitude/cohorts", "amplitude"),
    "profile": ("/v1/amplitude/profile", "amplitude"),
    "variants": ("/v1/experiment/variants", "experiment"),
    "target": ("/v1/adobe-target/profile", "target"),
    "mediarithmics-profile": ("/v1/mediarithmics/profile", "mediarithmics"),
    "choices": ("/v1/mediarithmics/choices", "mediarithmics"),
}
# CSV columns that identify a user for some endpoint; others are ignored.
ID_COLUMNS = ("user_id", "device_id", "tntid", "third_party_id", "user_point_id", "user_agent_id",
              "email_hash", "compartment_id", "user_account_id")


@dataclass
class Summary:
    fetched: int = 0
    not_found: int = 0
    failed: int = 0
    skipped: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.fetched + self.not_found + self.failed


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of id columns; a headerless one-column file is read as user ids."""
    with path.open(newline="", encoding="utf-8") as handle:
        sample = handle.readline()
        handle.seek(0)
        if any(column in sample.split(",")[0].strip().lower() for column in ID_COLUMNS):
            reader = csv.DictReader(handle)
            return [{k.strip(): (v or "").strip() for k, v in row.items() if k and k.strip() in ID_COLUMNS}
                    for row in reader]
        return [{"user_id": line.strip()} for line in handle if line.strip()]


def state_path(users: Path, endpoint: str) -> Path:
    return users.with_name(f"{users.name}.{endpoint}.warm-state")


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(done: int, total: int, started: float, now: float, width: int = 30) -> str:
    fraction = done / total if total else 1.0
    rate = done / (now - started) if now > started and done else 0.0
    eta = (total - done) / rate if rate else 0.0
    bar = "#" * int(fraction * width) + "." * (width - int(fraction * width))
    return f"[{bar}] {done}/{total} {fraction:4.0%} {rate:5.1f}/s ETA {_format_eta(eta)}"


# Answers that say the calls themselves are wrong, whatever the row: stop at the first.
CALL_REFUSED = frozenset({"HTTP 401 unauthorized", "HTTP 403", "HTTP 404 not_found", "HTTP 405 method_not_allowed"})


def warm(
    url: str,
    endpoint: str,
    users: Path,
    params: dict[str, str],
    per_minute: float,
    api_key: str = "",
    concurrency: int = 16,
    out: TextIO = sys.stderr,
    timeout: float = 5.0,
) -> Summary:
    import requests  # here, not at import: `ccproxy serve` must not load ssl before gevent patches it

    path, _upstream = ENDPOINTS[endpoint]
    rows = read_rows(users)
    state = state_path(users, endpoint)
    start_at = int(state.read_text().strip() or 0) if state.exists() else 0
    summary = Summary(skipped=start_at)
    session = requests.Session()
    if api_key:
        session.headers["Authorization"] = f"Bearer {api_key}"
    lock = threading.Lock()
    completed = [start_at]
    interval = 60.0 / per_minute if per_minute > 0 else 0.0
    started = time.monotonic()
    last_draw = 0.0

    def call(row: dict[str, str]) -> tuple[str, str]:
        """(outcome, the proxy's own reason when it refused)."""
        try:
            answer = session.get(url.rstrip("/") + path, params={**params, **row}, timeout=timeout)
            body = answer.json() if answer.headers.get("Content-Type", "").startswith("application/json") else {}
        except requests.RequestException as exc:
            return type(exc).__name__, f"{url} cannot be reached ({type(exc).__name__})"
        found = body.get("error") if isinstance(body, dict) else None
        error: dict = found if isinstance(found, dict) else {}
        if answer.status_code != 200:
            code = f"HTTP {answer.status_code}" + (f" {error['code']}" if error.get("code") else "")
            return code, f"{code}: {error.get('message', '')}".rstrip(": ")
        if body.get("fallback") is True:
            return "fallback", ""  # stand-in content (rate limited, down): nothing was cached
        return ("fetched" if body.get("found") else "not_found"), ""

    def fetch(row: dict[str, str]) -> None:
        record(call(row)[0])

    def record(outcome: str) -> None:
        with lock:
            if outcome == "fetched":
                summary.fetched += 1
            elif outcome == "not_found":
                summary.not_found += 1
            else:
                summary.failed += 1
                summary.errors[outcome] = summary.errors.get(outcome, 0) + 1

    def draw(final: bool = False) -> None:
        nonlocal last_draw
        now = time.monotonic()
        if final or now - last_draw >= 0.2:
            last_draw = now
            line = progress_line(summary.done + start_at, len(rows), started, now)
            out.write("\r" + line + ("\n" if final else ""))
            out.flush()

    # The first row alone: a call the proxy refuses as a whole (a wrong key, a missing
    # parameter the row cannot give, no proxy at all) would fail every row the same way,
    # paced, for as long as the file is long. A row's own bad id fails that row only.
    first = start_at
    if first < len(rows):
        outcome, reason = call(rows[first])
        # A missing parameter the row itself gives (no empty cell) is missing from every call.
        refused = outcome in CALL_REFUSED or (outcome == "HTTP 400 missing_parameter" and all(rows[first].values()))
        if refused or outcome.endswith(("ConnectionError", "InvalidURL", "MissingSchema", "InvalidSchema")):
            raise WarmRefused(f"the first call failed, so nothing else was sent: {reason}")
        record(outcome)
        first += 1
        completed[0] = first

    def rows_to_do() -> Iterator[tuple[int, dict[str, str]]]:
        for index in range(first, len(rows)):
            yield index, rows[index]

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            pending = []
            next_at = time.monotonic() + (interval if first > start_at else 0.0)  # after the first row
            for index, row in rows_to_do():
                # Pace the calls: at most per_minute, evenly spread.
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at = max(next_at, time.monotonic() - interval) + interval
                pending.append((index, pool.submit(fetch, row)))
                # Save progress: every row up to the oldest unfinished one is done.
                while pending and pending[0][1].done():
                    completed[0] = pending.pop(0)[0] + 1
                state.write_text(str(completed[0]))
                draw()
            for index, future in pending:
                future.result()
                completed[0] = index + 1
    except KeyboardInterrupt:
        state.write_text(str(completed[0]))
        out.write(f"\ninterrupted: progress saved in {state}; run the same command to resume\n")
        raise
    draw(final=True)
    state.unlink(missing_ok=True)
    return summary

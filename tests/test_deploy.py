"""deploy/: the Prometheus alerts (checked and unit-tested by promtool) and the Grafana
dashboard (every metric it reads is one a live proxy exports)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import requests
from servers import wait_for
from test_metrics import AUTH, RECS, proxy_env

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMTOOL = shutil.which("promtool")


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is missing: scripts/test installs Debian's prometheus package"
    return subprocess.run([PROMTOOL, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120)


def test_alert_rules_are_valid():
    done = promtool("check", "rules", "prometheus-rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_alert_rules_fire_on_synthetic_series():
    done = promtool("test", "rules", "prometheus-rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


# Words in PromQL that are not metric names.
_PROMQL_WORDS = {
    "sum", "by", "without", "rate", "irate", "increase", "max", "min", "avg", "count", "topk", "bottomk",
    "histogram_quantile", "le", "and", "or", "unless", "on", "ignoring", "group_left", "group_right",
    "max_over_time", "min_over_time", "avg_over_time", "clamp_min", "clamp_max", "time", "vector",
    "abs", "bool", "offset", "label_replace", "sort_desc", "sort",
}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers not inside {...} or "..." or [...]."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\$\w+", "", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)) - _PROMQL_WORDS
    return {n for n in names if not re.fullmatch(r"\d.*|e\d+", n)}


def exported(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_reads_only_exported_metrics(servers, sandboxes, tmp_path):
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 8
    env = proxy_env(sandboxes, tmp_path)
    env.update({"CCPROXY_CACHE_TTL_RECOMMENDATIONS": "1", "CCPROXY_CACHE_GRACE": "0"})
    served = servers.start(["serve", "--workers", "2"], env)
    # A few requests of each kind: hits and misses, stale answers, failures, a 429, a write.
    for n in range(6):  # fresh connections: both workers cache "same"
        requests.get(served.base + RECS + f"d{n}", headers=AUTH, timeout=10)
        requests.get(served.base + RECS + "same", headers=AUTH, timeout=10)
    time.sleep(1.2)  # past the 1 s TTL, so a failing upstream is answered stale
    sandboxes.state("amplitude").set_fault("error")
    wait_for(lambda: requests.get(served.base + RECS + "same", headers=AUTH, timeout=10)
             .headers.get("X-Cache") == "STALE", seconds=30, what="a stale answer")
    sandboxes.state("amplitude").set_fault("none")
    sandboxes.state("amplitude").set_fault("ratelimit", count=1)
    requests.get(served.base + RECS + "limited", headers=AUTH, timeout=10)
    sandboxes.state("amplitude").set_fault("error", count=3)
    # Not recommendations: those answer "none for now" while Amplitude is paused.
    requests.get(served.base + "/v1/amplitude/properties?user_id=failing", headers=AUTH, timeout=10)
    requests.post(served.base + "/v1/mediarithmics/activities", headers=AUTH, timeout=10,
                  json={"user_id": "u1", "type": "open"})
    text = requests.get(served.base + "/metrics", headers=AUTH, timeout=10).text
    have = exported(text)
    for expr in exprs:
        for name in metric_names(expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert name in have or f"{base}_bucket" in have, f"{name} (in {expr!r}) is not exported"


def test_metric_names_of_an_expression():
    assert metric_names('sum by (route) (rate(ccproxy_requests_total{status=~"5.."}[5m]))') == \
        {"ccproxy_requests_total"}
    assert metric_names("sum by (job, upstream) (a) / on (job) b") == {"a", "b"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(x_bucket[1m]))) / y") == {"x_bucket", "y"}

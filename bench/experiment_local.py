"""Local experiment evaluation beside the hit path (issue 16).

    .venv/bin/python bench/experiment_local.py      # prints the figures as JSON

Starts the sandbox Experiment upstream (20 ms latency), the proxy in local mode and in remote
mode (`ccproxy serve`, gevent, 2 workers), then drives with wrk: local mode with every request
a distinct user (in remote mode each would be a `/v1/vardata` call), local mode with each user
rendered three times as Braze does, and remote mode's cached hit path (one warmed user). Counts
the sandbox's vardata calls during the local runs. Prints `uptime` (the machine is shared).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PY, Processes, free_port, wait_up, wrk  # noqa: E402

KEY = "sandbox-experiment-deployment-key"
FLAGS = "checkout-button,hero-banner,premium-upsell"


def serve(procs: Processes, sandbox: str, mode: str, workers: int) -> str:
    port = free_port()
    procs.start([PY, "-m", "proxy.cli", "serve", "--no-auth", "--port", str(port), "--workers", str(workers)],
                {"CCPROXY_EXPERIMENT_URL": sandbox, "CCPROXY_EXPERIMENT_FLAGS_URL": sandbox,
                 "CCPROXY_EXPERIMENT_DEPLOYMENT_KEY": KEY, "CCPROXY_EXPERIMENT_MODE": mode,
                 "CCPROXY_LOG_LEVEL": "WARNING", "CCPROXY_CACHE_TTL_VARIANTS": "3600"})
    url = f"http://127.0.0.1:{port}"
    wait_up(url + "/healthz")
    return url


def vardata_calls(sandbox: str) -> int:
    return requests.get(f"{sandbox}/__sandbox/stats", timeout=5).json()["paths"].get("/v1/vardata", 0)


def main() -> None:
    seconds, workers = 8, int(os.environ.get("WORKERS", "2"))
    conns = int(os.environ.get("CONNECTIONS", "64"))
    procs = Processes()
    try:
        sandbox_port = free_port()
        sandbox = f"http://127.0.0.1:{sandbox_port}"
        procs.start([PY, "-m", "proxy.sandbox", "experiment", "--port", str(sandbox_port),
                     "--workers", "1", "--latency", "0.02"])
        wait_up(sandbox + "/__sandbox/stats")
        local, remote = serve(procs, sandbox, "local", workers), serve(procs, sandbox, "remote", workers)
        # Each worker loads its flags on a probe; new connections reach every worker.
        deadline, loaded = time.monotonic() + 60, set()
        while len(loaded) < workers and time.monotonic() < deadline:
            body = requests.get(local + "/readyz", timeout=5).json()
            if body.get("experiment_flags", {}).get("usable"):
                loaded.add(body["worker"])
            time.sleep(0.02)
        hit_url = f"{remote}/v1/experiment/variants?user_id=hit-1&flag_keys={FLAGS}&user_properties.premium=true&track=false"
        requests.get(hit_url, timeout=5).raise_for_status()
        results = {"workers_loaded": len(loaded)}
        before = vardata_calls(sandbox)
        # A short first run warms both workers (first requests, connection set-up).
        wrk(local, "variants_local.lua", 64, 2)
        results["local_distinct_users"] = wrk(local, "variants_local.lua", conns, seconds)
        results["local_three_renders_per_user"] = wrk(local, "variants_local_renders.lua", conns, seconds)
        results["local_vardata_calls"] = vardata_calls(sandbox) - before
        results["remote_hit_path"] = wrk(hit_url, "fixed.lua", conns, seconds)
        results["local_one_user"] = wrk(hit_url.replace(remote, local), "fixed.lua", conns, seconds)
    finally:
        procs.stop()
    results["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""The standard send: 10,000 recipients, 3 renders, the four templates in one message, a 60 s
Amplitude 429 storm in the middle, against one `ccproxy demo` with its defaults.

    .venv/bin/python bench/simulate_standard.py [--recipients 10000] [--rate 5000]

Prints the `ccproxy simulate-send` table and writes the JSON report to
bench/simulate_standard.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=5000.0, help="messages per minute")
    args = parser.parse_args()
    duration = 60 * args.recipients / args.rate
    storm_at = max(0.0, duration / 2 - 30)
    work = Path(tempfile.mkdtemp(prefix="ccproxy-sim-"))
    faults = work / "faults.toml"
    faults.write_text(f'[[fault]]\nat = {storm_at:.0f}\nupstream = "amplitude"\nmode = "ratelimit"\n'
                      'seconds = 60\nduration = 60\n')
    port = free_port()
    log = (work / "demo.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    demo = subprocess.Popen([sys.executable, "-m", "proxy.cli", "demo", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or demo.poll() is not None:
                    raise SystemExit("the demo did not come up") from None
                time.sleep(0.3)
        common = [sys.executable, "-m", "proxy.cli", "simulate-send", "--url", f"http://127.0.0.1:{port}",
                  "--demo-log", str(work / "demo.log"), "--recipients", str(args.recipients),
                  "--rate", str(args.rate), "--faults", str(faults)]
        for name in ("recs_block", "hero_banner", "loyalty_badge", "consent_footer"):
            common += ["--template", name]
        done = subprocess.run([*common, "--json"], capture_output=True, text=True, check=True)
        (HERE / "simulate_standard.json").write_text(done.stdout)
        print(done.stdout)
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        demo.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

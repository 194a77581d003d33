"""The standard send: 10,000 recipients, 3 renders, the four templates in one message (plus the
send's own activity write, keyed by dispatch and user), a 60 s Amplitude 429 storm in the
middle, against one `ccproxy demo` (`ccproxy serve` with its defaults, on the sandboxes).

    .venv/bin/python bench/simulate_standard.py [--recipients 10000] [--rate 5000]
        [--set CCPROXY_NAME=value ...] [--with-retry] [--find-rate] [--label after] [--no-results]

Prints the `ccproxy simulate-send` table, writes the JSON report to
bench/simulate_standard[-<label>].json and (unless --no-results) its table as the "Standard
send" section of bench/RESULTS.md, after the marker that bench/run.py keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import free_port  # noqa: E402

MARKER = "<!-- other bench scripts: kept by run.py -->"
SECTION = "## Standard send: `ccproxy simulate-send` (issue 18)"
TEMPLATES = ("recs_block", "hero_banner", "loyalty_badge", "consent_footer")
# The README's activity write: one per message however many renders post it.
WRITE = ("{% connected_content BASE/v1/mediarithmics/activities?idempotency_key={{campaign.${dispatch_id}}}-"
         "{{${user_id} | url_param_escape}} :method post :content_type application/json :body "
         '{"$type":"EMAIL","$ts":1735689600000,"$email_hash":"{{${email_address} | sha2}}",'
         '"campaign":"standard"} :retry :save sent %}\n')


def run(args: argparse.Namespace, work: Path) -> tuple[dict, str, str]:
    duration = 60 * args.recipients / args.rate
    storm_at = max(0.0, duration / 2 - 30)
    faults = work / "faults.toml"
    faults.write_text(f'[[fault]]\nat = {storm_at:.0f}\nupstream = "amplitude"\nmode = "ratelimit"\n'
                      'seconds = 60\nduration = 60\n')
    port = free_port()
    log = (work / "demo.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    env["CCPROXY_OUTBOX_PATH"] = str(work / "outbox.sqlite3")
    env.update(dict(item.split("=", 1) for item in args.set))
    demo = subprocess.Popen([sys.executable, "-m", "proxy.cli", "demo", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=work)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or demo.poll() is not None:
                    raise SystemExit("the demo did not come up") from None
                time.sleep(0.3)
        write = work / "write.liquid"
        write.write_text(WRITE.replace("BASE", base))
        common = [sys.executable, "-m", "proxy.cli", "simulate-send", "--url", base,
                  "--demo-log", str(work / "demo.log"), "--recipients", str(args.recipients),
                  "--rate", str(args.rate), "--faults", str(faults), "--liquid", str(write),
                  "--drain-timeout", "120", "--concurrency", str(args.concurrency)]
        if args.find_rate:
            # The highest safe rate of this setup, without the storm: probes from --rate up.
            common = [c for c in common if c not in ("--faults", str(faults))]
            common += ["--find-rate", "--probe-seconds", "20", "--find-rate-budget", str(args.find_rate_budget)]
        if args.with_retry:
            # The snippets as they were before issue 18: :retry on the data tags too.
            sys.path.insert(0, str(HERE.parent))
            from proxy.simulate import template_liquid

            write.write_text(template_liquid(list(TEMPLATES), base, "").replace(
                " :cache_max_age", " :retry :cache_max_age") + "\n" + write.read_text())
        else:
            for name in TEMPLATES:
                common += ["--template", name]
        done = subprocess.run([*common, "--json"], capture_output=True, text=True, check=True)
        report = json.loads(done.stdout)
        from proxy.simulate import table

        command = "ccproxy simulate-send " + " ".join(
            a if not a.startswith(("/", "http")) else "…" for a in common[4:])
        return report, table(report), command
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        demo.wait(30)


def results_section(label: str, args: argparse.Namespace, report: dict, text: str) -> str:
    m, up = report["messages"], report["upstreams"]
    total = max(m["total"], 1)
    per_recipient = sum(u["calls"] for u in up.values()) / max(report["scenario"]["recipients"], 1)
    w = report["writes"]
    settings = " ".join(args.set + (["data tags with :retry"] if args.with_retry else [])) or "defaults"
    return "\n".join([
        f"### {label} ({settings})", "",
        f"Command: `.venv/bin/python bench/simulate_standard.py {' '.join(sys.argv[1:])}`"
        f" on {platform.node()} ({os.cpu_count()} cores, {platform.python_version()}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        f"Headline: **{100 * m['aborted'] / total:.1f} % aborted** ({m['aborted']} of {m['total']}), "
        f"{100 * m['fallback'] / total:.1f} % with fallback, {100 * m['complete'] / total:.1f} % complete; "
        f"**{per_recipient:.2f} upstream calls per recipient** (all upstreams); "
        f"**{w.get('mediarithmics_duplicated', 0)} duplicated writes** "
        f"({w['accepted']} accepted, {w['delivered']} delivered, {w['queued']} queued, {w['dead']} dead).", "",
        *([f"Highest safe rate (no message aborted, no halt): **{report['find_rate']['safe_rate_per_minute']} "
            f"messages a minute** ({report['find_rate']['stopped']}); the figures above are that probe's.", ""]
          if "find_rate" in report else []),
        "```", text, "```", ""])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=5000.0, help="messages per minute")
    parser.add_argument("--set", action="append", default=[], metavar="CCPROXY_NAME=VALUE",
                        help="a setting for the demo (repeatable); default: none, the defaults")
    parser.add_argument("--concurrency", type=int, default=1000,
                        help="the simulator's calls in flight: Braze holds none back, so enough "
                             "that the simulator never does")
    parser.add_argument("--find-rate", action="store_true",
                        help="search the highest safe rate (no storm; 20 s probes from --rate)")
    parser.add_argument("--find-rate-budget", type=float, default=420.0)
    parser.add_argument("--with-retry", action="store_true",
                        help="the templates' data tags with :retry, as before issue 18 (to compare)")
    parser.add_argument("--label", default="", help="names the JSON file and the RESULTS.md subsection")
    parser.add_argument("--no-results", action="store_true", help="do not touch bench/RESULTS.md")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    work = Path(tempfile.mkdtemp(prefix="ccproxy-sim-"))
    report, text, _command = run(args, work)
    slug = "-".join("".join(c if c.isalnum() else " " for c in args.label.lower()).split())
    name = f"simulate_standard-{slug}.json" if slug else "simulate_standard.json"
    (HERE / name).write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    if not args.no_results:
        title = f"Standard send, {args.label}" if args.label else "Standard send"
        update_results(args.label or "standard", results_section(title, args, report, text))
    return 0


def update_results(label: str, subsection: str) -> None:
    """Add or replace this label's subsection of the standard-send section, below the marker
    bench/run.py keeps (the end of RESULTS.md)."""
    import re

    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else f"# Benchmark results\n\n{MARKER}\n"
    if MARKER not in text:
        text = text.rstrip("\n") + f"\n\n{MARKER}\n"
    if SECTION not in text.partition(MARKER)[2]:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n"
    start, end = f"<!-- simulate_standard:{label} -->", f"<!-- /simulate_standard:{label} -->"
    block = f"{start}\n{subsection.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())

"""Where a cache miss's CPU goes, under load: the proxy as `ccproxy serve` runs it (one worker),
a non-Python upstream (nginx + echo module answering fixed JSON after 20 ms, as in
bench/saturation.py), wrk with a distinct user per request on 256 connections, py-spy sampling
the worker. Also reports each process's CPU share. Writes bench/PROFILE-miss.txt.

    .venv/bin/python bench/profile_miss.py      # needs wrk, nginx + echo module, py-spy (bench extra)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import AMPLITUDE_KEY, PY, ROOT, Processes, cpu_seconds, free_port, wait_up  # noqa: E402
from saturation import start_nginx  # noqa: E402


def main() -> None:
    procs = Processes()
    proxy_port = free_port()
    proxy = f"http://127.0.0.1:{proxy_port}"
    tmp = Path(tempfile.mkdtemp(prefix="ccproxy-profile-"))
    try:
        sandbox = start_nginx(procs, tmp, 0.02)
        up = procs.procs[-1]
        server = procs.start([PY, "-m", "proxy.cli", "serve", "--no-auth", "--port", str(proxy_port), "--workers", "1"],
                             {"CCPROXY_AMPLITUDE_URL": sandbox, "CCPROXY_AMPLITUDE_SECRET_KEY": AMPLITUDE_KEY,
                              "CCPROXY_RATE_LIMIT_AMPLITUDE": "0", "CCPROXY_LOG_LEVEL": "WARNING"})
        wait_up(proxy + "/healthz")
        worker = int(subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()[0])
        up_worker = up.pid  # nginx runs as one process (master_process off)
        load = subprocess.Popen(["wrk", "-t2", "-c256", "-d10s", "-s", str(HERE / "miss.lua"), proxy],
                                cwd=ROOT, stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        before = {name: cpu_seconds(pid) for name, pid in (("proxy worker", worker), ("upstream", up_worker),
                                                          ("wrk", load.pid))}
        started = time.monotonic()
        raw = HERE / "out" / "miss.raw"
        raw.parent.mkdir(exist_ok=True)
        subprocess.run([str(Path(PY).parent / "py-spy"), "record", "-d", "5", "-r", "200", "--format", "raw",
                        "-o", str(raw), "-p", str(worker)], capture_output=True, check=True)
        elapsed = time.monotonic() - started
        shares = {name: (cpu_seconds(pid) - before[name]) / elapsed
                  for name, pid in (("proxy worker", worker), ("upstream", up_worker), ("wrk", load.pid))}
        summary = next(line for line in load.communicate()[0].splitlines() if line.startswith("JSON "))
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    inclusive, exclusive, total, idle = Counter(), Counter(), 0, 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "_WorkerGreenlet.run" in stack and stack.endswith("acquire_with_timeout (gevent/_threading.py:36)"):
            idle += int(count)  # gevent's resolver threads waiting for work: no CPU, not the worker's loop
            continue
        total += int(count)
        frames = stack.split(";")
        exclusive[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    lines = ["Cache misses under load (wrk, 256 connections, distinct users, nginx upstream answering after "
             "20 ms); py-spy samples of the proxy worker, inclusive share (self share below):", "",
             "wrk: " + summary[5:], "",
             "CPU (cores) while sampled: " + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()), "",
             f"Left out: {idle} samples of gevent's resolver thread pool waiting for work (idle threads; "
             "they exist because new upstream connections resolve the host there).", ""]
    lines += [f"{n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(40)]
    lines += ["", "Self time (the frame itself, not what it calls):", ""]
    lines += [f"{n / total:6.1%}  {frame}" for frame, n in exclusive.most_common(25)]
    (HERE / "PROFILE-miss.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


if __name__ == "__main__":
    main()

"""Where local experiment evaluation's time goes: cProfile over the proxy's WSGI app in process
(no network), every request a distinct user asking the three sandbox flags, next to remote
mode's cache hit of the same query; and the CPU time per request (`time.process_time`, which a
busy machine disturbs far less than wall-clock latency) of each case the wrk benchmark drives.
Writes bench/PROFILE-local.txt.

    .venv/bin/python bench/profile_local.py
"""

from __future__ import annotations

import io
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from profile_hit import per_request_us, profiled  # noqa: E402

from proxy import config, create_app  # noqa: E402
from proxy.sandbox import stack  # noqa: E402

QUERY = "flag_keys=checkout-button,hero-banner,premium-upsell&user_properties.premium=true&track=false"
N = 20000


def caller(app, distinct: bool, renders: int = 1):
    base = {"REQUEST_METHOD": "GET", "PATH_INFO": "/v1/experiment/variants", "SERVER_NAME": "bench",
            "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr}
    count = [0]

    def call():
        count[0] += 1
        user = f"local-{count[0] // renders}" if distinct else "hit-1"
        environ = {**base, "QUERY_STRING": f"{QUERY}&user_id={user}", "wsgi.input": io.BytesIO()}
        b"".join(app(environ, lambda *a: None))

    return call


def cpu_us(call, n: int = N) -> float:
    """CPU microseconds per request."""
    return per_request_us(call, n, clock=time.process_time)


def main() -> None:
    sandboxes = stack.start()
    try:
        overrides = {**sandboxes.proxy_settings(), "log_level": "WARNING", "cache_ttl_variants": 3600}
        remote = create_app(config.load(overrides=overrides, environ={}))
        local = create_app(config.load(overrides={**overrides, "experiment_mode": "local"}, environ={}))
        store = local.extensions["ccproxy"].flag_store
        store.current()
        store.wait(30)
        hit, distinct = caller(remote.wsgi_app, False), caller(local.wsgi_app, True)
        hit()  # the miss that fills the cache
        distinct()
        hit_us, local_us = cpu_us(hit), cpu_us(distinct)
        renders_us = cpu_us(caller(local.wsgi_app, True, renders=3))
        one_us = cpu_us(caller(local.wsgi_app, False))
        profiler = profiled(distinct)
    finally:
        sandboxes.stop()
    out = io.StringIO()
    out.write(f"in-process, /v1/experiment/variants?{QUERY}&user_id=<distinct>\n")
    out.write(f"CPU per request: remote mode cache hit {hit_us:.1f} us; local mode: distinct users "
              f"{local_us:.1f} us ({local_us / hit_us:.2f}x the hit), each user 3 renders {renders_us:.1f} us "
              f"({renders_us / hit_us:.2f}x), one user {one_us:.1f} us ({one_us / hit_us:.2f}x)\n\n")
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(35)
    stats.sort_stats("tottime").print_stats(25)
    (HERE / "PROFILE-local.txt").write_text(out.getvalue())
    print(out.getvalue()[:400])


if __name__ == "__main__":
    main()

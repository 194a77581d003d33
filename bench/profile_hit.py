"""Where a cache hit's time goes: cProfile over the proxy's WSGI app in process (no network),
next to the bare Flask baseline. Writes bench/PROFILE-hit.txt.

    .venv/bin/python bench/profile_hit.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from baseline import make_app as make_bare  # noqa: E402

from proxy import config, create_app  # noqa: E402
from proxy.sandbox import stack  # noqa: E402

QUERY = "rec_id=testRecId&user_id=warm5"


def caller(app):
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/v1/amplitude/recommendations",
               "QUERY_STRING": QUERY, "SERVER_NAME": "bench", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr}

    def call():
        b"".join(app(dict(environ), lambda *a: None))

    return call


def per_request_us(call, n: int = 20000, clock=time.perf_counter) -> float:
    started = clock()
    for _ in range(n):
        call()
    return (clock() - started) / n * 1e6


def profiled(call, n: int = 5000) -> cProfile.Profile:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n):
        call()
    profiler.disable()
    return profiler


def main() -> None:
    sandboxes = stack.start()
    try:
        settings = config.load(overrides={**sandboxes.proxy_settings(), "log_level": "WARNING"}, environ={})
        proxy = create_app(settings)
        call = caller(proxy.wsgi_app)
        call()  # the miss that fills the cache
        bare_us = per_request_us(caller(make_bare().wsgi_app))
        proxy_us = per_request_us(call)
        profiler = profiled(call)
    finally:
        sandboxes.stop()
    out = io.StringIO()
    out.write(f"in-process, one cache hit of /v1/amplitude/recommendations?{QUERY}\n")
    out.write(f"bare Flask jsonify: {bare_us:.1f} us/request; proxy hit: {proxy_us:.1f} us/request "
              f"({bare_us / proxy_us:.2f}x)\n\n")
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
    (HERE / "PROFILE-hit.txt").write_text(out.getvalue())
    print(out.getvalue()[:400])


if __name__ == "__main__":
    main()

"""The baseline: a bare Flask `jsonify` endpoint on the same gunicorn settings as the proxy
(gevent by default; `--worker-class gthread` for the threaded baseline). bench/saturation.py
also serves `make_app` on granian.

`--upstream URL`: the floor of a cache miss instead (bench/miss_cost.py). Each request makes
one GET to the upstream on a pooled urllib3 connection, as the proxy's client does, and
answers the upstream's JSON decoded and encoded again. There is no cache, shaping, guard or
metric."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.serving import WsgiServer, gunicorn_options  # noqa: E402

# The same flat answer the proxy gives for testUser, so both serialise equal work.
BODY = {
    "ok": True, "found": True, "user_id": "testUser", "device_id": "ffff-ffff-ffff-ffff",
    "rec_id": "testRecId", "child_rec_id": "testRecId",
    "items": ["cookie", "cracker", "chocolate milk", "donut", "croissant"],
    "item_1": "cookie", "item_2": "cracker", "item_3": "chocolate milk", "item_4": "donut",
    "item_5": "croissant", "item_count": 5,
    "items_joined": "cookie, cracker, chocolate milk, donut, croissant",
    "is_control": False, "source": "model", "last_updated": "2020-12-22T20:58:40Z",
}


def make_app(upstream: str | None = None):
    from flask import Flask, jsonify, request

    app = Flask("baseline")

    if upstream is None:
        @app.get("/v1/amplitude/recommendations")
        def recommendations():
            return jsonify(BODY)
    else:
        import json
        from urllib.parse import urlsplit

        import urllib3

        origin = urlsplit(upstream)
        pool = urllib3.HTTPConnectionPool(origin.hostname, origin.port, maxsize=512, retries=False)

        @app.get("/v1/amplitude/recommendations")
        def passthrough():
            answer = pool.request("GET", "/v1/userprofile", fields={
                "user_id": request.args["user_id"], "rec_id": request.args["rec_id"]},
                headers={"Authorization": "Api-Key bench"}, timeout=5.0)
            return jsonify(json.loads(answer.data))

    @app.get("/healthz")
    def healthz():
        return jsonify({"ok": True})

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-class", default="gevent", help="gevent (the proxy's) or gthread")
    parser.add_argument("--threads", type=int, default=8, help="per worker, for gthread")
    parser.add_argument("--upstream", default=None, help="pass each request to this upstream (a miss's floor)")
    args = parser.parse_args()
    options = gunicorn_options("127.0.0.1", args.port, args.workers, "warning")
    if args.worker_class != "gevent":
        options.update({"worker_class": args.worker_class, "threads": args.threads})
    WsgiServer(lambda: make_app(args.upstream), options).run()

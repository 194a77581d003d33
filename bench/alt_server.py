"""The proxy on another gunicorn worker class, for comparison only (`ccproxy serve` uses gevent):

    python bench/alt_server.py --port 9100 --worker-class gthread --threads 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.serving import WsgiServer, gunicorn_options  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-class", default="gthread")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    def load_app():
        from proxy import config, create_app

        return create_app(config.load())

    options = gunicorn_options("127.0.0.1", args.port, args.workers, "warning")
    options.update({"worker_class": args.worker_class, "threads": args.threads})
    WsgiServer(load_app, options).run()

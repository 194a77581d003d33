"""Serve one sandbox upstream on gunicorn + gevent (benchmarks, manual tests):

    python -m proxy.sandbox amplitude --port 9001 --latency 0.02
"""

from __future__ import annotations

import argparse

from ..serving import WsgiServer, gunicorn_options

UPSTREAMS = ("amplitude", "experiment", "target", "mediarithmics")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m proxy.sandbox")
    parser.add_argument("upstream", choices=UPSTREAMS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    parser.add_argument("--rate", type=int, default=None, help="calls per minute before 429")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    def load_app():
        import importlib
        import logging

        from .base import SandboxState

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        module = importlib.import_module(f"proxy.sandbox.{args.upstream}")
        return module.make_app(state=SandboxState(args.latency, args.rate))

    WsgiServer(load_app, gunicorn_options(args.host, args.port, args.workers, "warning")).run()


if __name__ == "__main__":
    main()

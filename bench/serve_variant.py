"""The proxy exactly as `ccproxy serve` runs it (proxy.serving.serve), with the serving
choice swapped, for the fairness comparison in bench/fairness.py:

    python bench/serve_variant.py --port 9100 --variant fair|unfair [--counts FILE]

- fair: `ccproxy serve` as shipped (the guarded gevent worker, yielding after each answer);
- fair_accept1: the same, accepting one new connection per turn of the loop (gunicorn's own
  choice with several workers) instead of a batch;
- unfair: the guarded gevent worker as it was before issue 15 (no yield, gunicorn's accept).

With --counts, each worker appends one line per closed connection, "pid requests", to FILE:
how many requests each connection was served, and by which worker (accept balance).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import config, serving  # noqa: E402


def counting(base: type, path: str) -> type:
    from gevent import getcurrent

    class Counting(base):  # type: ignore[misc, valid-type]
        served: dict[Any, int] = {}

        def handle(self, listener: Any, client: Any, addr: Any) -> None:
            me = getcurrent()
            self.served[me] = 0
            try:
                super().handle(listener, client, addr)
            finally:
                count = self.served.pop(me, 0)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, f"{os.getpid()} {count}\n".encode())
                finally:
                    os.close(fd)

        def handle_request(self, *args: Any) -> Any:
            self.served[getcurrent()] = self.served.get(getcurrent(), 0) + 1
            return super().handle_request(*args)

        def _count_request(self) -> bool:  # an answer of the fast lane
            self.served[getcurrent()] = self.served.get(getcurrent(), 0) + 1
            return bool(super()._count_request())

    return Counting


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variant", choices=("fair", "fair_accept1", "unfair"), default="fair")
    parser.add_argument("--counts", default="")
    args = parser.parse_args()
    shipped = fair = serving.fair_worker_class
    if args.variant == "unfair":
        fair = lambda base: base  # noqa: E731
    elif args.variant == "fair_accept1":
        fair = lambda base: shipped(base, accept_batch=1)  # noqa: E731
    if args.counts:
        serving.fair_worker_class = lambda base: counting(fair(base), args.counts)  # type: ignore[assignment]
    else:
        serving.fair_worker_class = fair  # type: ignore[assignment]
    settings = config.load()
    serving.serve(settings, serving.listen("127.0.0.1", args.port), args.workers)

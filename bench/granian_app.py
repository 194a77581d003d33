"""The proxy's WSGI app for granian (bench/saturation.py measures it as an alternative server):

    granian --interface wsgi --factory --working-dir bench granian_app:load_app

No gevent here: granian runs WSGI calls on a fixed pool of blocking threads per worker, so a
cache miss holds a thread while it waits on the upstream (`--blocking-threads` bounds the
misses in flight). Outbox delivery is not started (the bench sends no writes)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load_app():
    from proxy import config, create_app

    return create_app(config.load())

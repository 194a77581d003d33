"""A preview's render process: `python -m proxy.preview_worker <fd>`, started and killed by
`preview_pool.PreviewPool`, one Liquid preview at a time.

It renders with python-liquid's resource limits (`render_limits.LiquidLimits`), at a lower
CPU priority than the proxy's workers and with a capped address space, and holds no
credential (its environment has no `CCPROXY_*` variable). It cannot fetch anything itself:
each `connected_content` is asked of the worker that started it, which answers from the
proxy's own cached endpoints.

The protocol, over a Unix socket pair: messages are a 4-byte big-endian length and that
many bytes of JSON.
  process -> worker  {"op": "ready"}                       once, after start-up
  worker -> process  {"op": "render", "source", "attributes", "allowed_hosts", "limits"}
  process -> worker  {"op": "fetch", "path", "args"}       for each connected_content ...
  worker -> process  {"status", "body", "cache"}           ... and its answer
  process -> worker  {"op": "done", "answer"} or {"op": "error", "code", "message"[, "restart"]}
"""

from __future__ import annotations

import json
import os
import resource
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from .errors import WorkerGone

_HEADER = struct.Struct(">I")
# No single message is larger: the output limit plus JSON escaping, calls and bodies.
MAX_MESSAGE = 64 << 20


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message, default=str).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def receive(sock: socket.socket) -> dict[str, Any]:
    """One message; EOFError when the other side has gone."""
    (size,) = _HEADER.unpack(_read_exactly(sock, _HEADER.size))
    if size > MAX_MESSAGE:
        raise EOFError(f"a message of {size} bytes is larger than {MAX_MESSAGE}")
    message = json.loads(_read_exactly(sock, size))
    if not isinstance(message, dict):
        raise EOFError("a message is not a JSON object")
    return message


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, missing = [], size
    while missing:
        chunk = sock.recv(min(missing, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def render_job(sock: socket.socket, job: dict[str, Any]) -> dict[str, Any]:
    """Render one preview; every outcome is a message for the worker."""
    from liquid.exceptions import ResourceLimitError

    from .liquid_preview import Fetched, render_liquid
    from .render_limits import LiquidLimits

    limits = LiquidLimits(**job["limits"])

    fetched: dict[str, list[Any]] = {}  # path -> JSON answers, for the linter's open maps

    def resolve(path: str, args: dict[str, str]) -> Fetched:
        try:
            send(sock, {"op": "fetch", "path": path, "args": args})
            reply = receive(sock)
        except (EOFError, OSError) as exc:
            raise WorkerGone(str(exc)) from None
        if isinstance(reply["body"], dict):
            fetched.setdefault(path, []).append(reply["body"])
        return Fetched(int(reply["status"]), reply["body"], str(reply.get("cache", "-")))

    try:
        blocks = Path(job["content_blocks"]) if job.get("content_blocks") else None
        answer = render_liquid(job["source"], job["attributes"], resolve, set(job["allowed_hosts"]),
                               content_blocks=blocks, environment=limits.environment_class())
    except ResourceLimitError as exc:
        return {"op": "error", "code": "liquid_limit", "message": limits.describe(exc)}
    except MemoryError:
        # The process may be left in a poor state: it answers, then stops.
        return {"op": "error", "code": "liquid_limit", "message": limits.memory_message(), "restart": True}
    except RecursionError:
        return {"op": "error", "code": "liquid_limit",
                "message": "recursion: the message nests too deeply to render"}
    except Exception as exc:  # Liquid syntax or render errors (a filter's OSError too), for the author
        return {"op": "error", "code": "liquid_error", "message": f"Liquid error: {exc}"}
    # Linted here, not in the worker: parsing a long message is CPU the send path must not
    # wait behind, and it falls under the same clock and memory cap as the render.
    from .liquid_lint import lint  # after the render: its imports are not the data calls' time

    try:
        answer["warnings"] = lint(job["source"], fetched, job["allowed_hosts"])
    except (RecursionError, ValueError) as exc:  # a lint that cannot read the message takes nothing away
        answer["warnings"] = [{"line": 1, "code": "not_linted",
                               "message": f"the message could not be checked ({type(exc).__name__})"}]
    return {"op": "done", "answer": answer}


def main(fd: int) -> int:
    # The send path comes first: previews get the CPU the proxy's workers leave.
    os.nice(10)
    from .render_limits import PREVIEW_MEMORY_BYTES

    resource.setrlimit(resource.RLIMIT_AS, (PREVIEW_MEMORY_BYTES, PREVIEW_MEMORY_BYTES))
    # Import what every job needs now, not on the clock of the first preview.
    from . import liquid_lint, liquid_preview  # noqa: F401

    sock = socket.socket(fileno=fd)
    # A gevent worker made the pair non-blocking; this process waits on it plainly.
    sock.setblocking(True)
    try:
        send(sock, {"op": "ready"})
        while True:
            job = receive(sock)
            outcome = render_job(sock, job)
            send(sock, outcome)
            if outcome.get("restart"):
                return 0
    except (EOFError, OSError, WorkerGone):
        return 0  # the worker has gone, or killed the render it waited for


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))

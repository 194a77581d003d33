"""Braze Liquid previews on python-liquid: `{% connected_content %}` and `{% abort_message %}`.

connected_content URLs are resolved in process against this proxy's own endpoints,
never fetched: a URL for another host, or for a path the proxy does not serve, is
refused (no SSRF), and previews never write or track.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import parse_qsl, quote, urlsplit

from liquid import Environment, ast
from liquid.exceptions import LiquidError
from liquid.tag import Tag
from liquid.token import TOKEN_EXPRESSION, TOKEN_TAG

# Braze writes profile attributes as ${name}; Liquid has no such syntax.
BRAZE_ATTRIBUTE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
ATTRIBUTES_VAR = "braze_attributes"
_SAVE = re.compile(r":save\s+([A-Za-z_][A-Za-z0-9_]*)")
_METHOD = re.compile(r":method\s+([A-Za-z]+)")
_ABORT = re.compile(r"""^\(\s*(?:"([^"]*)"|'([^']*)')?\s*\)$""")


class MessageAborted(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Fetched:
    """What the resolver returns for one connected_content URL."""

    status: int
    body: Any  # dict for JSON answers, str for text
    cache: str = "-"


Resolver = Callable[[str, dict[str, str]], Fetched]


@dataclass
class PreviewRun:
    """Per-render state kept on the environment: the resolver and what was called."""

    resolver: Resolver
    allowed_hosts: set[str]
    calls: list[dict[str, Any]] = field(default_factory=list)


class ConnectedContentNode(ast.Node):
    __slots__ = ("markup",)

    def __init__(self, token: Any, markup: str):
        super().__init__(token)
        self.markup = markup
        self.blank = False

    def __str__(self) -> str:
        return f"{{% connected_content {self.markup} %}}"

    def render_to_output(self, context: Any, buffer: TextIO) -> int:
        run: PreviewRun = context.env.preview_run
        # The tag's markup may itself hold Liquid ({{${user_id}}}): render it first.
        markup = context.env.from_string(self.markup).render(**dict(context.scope))
        url = markup.split()[0] if markup.split() else ""
        save = _SAVE.search(markup)
        method_match = _METHOD.search(markup)
        method = method_match.group(1).lower() if method_match else "get"
        record: dict[str, Any] = {"url": url, "save": save.group(1) if save else None}
        started = time.perf_counter()
        fetched = self._fetch(run, url, method, record)
        record.update({"status": fetched.status, "cache": fetched.cache,
                       "ms": round((time.perf_counter() - started) * 1000, 2)})
        run.calls.append(record)
        if save:
            value = fetched.body
            if isinstance(value, dict):
                # Braze adds the status to a parsed JSON object.
                value = {**value, "__http_status_code__": fetched.status}
            context.assign(save.group(1), value)
            return 0
        if "refused" in record:
            return 0
        text = fetched.body if isinstance(fetched.body, str) else json.dumps(fetched.body)
        return buffer.write(text)

    @staticmethod
    def _fetch(run: PreviewRun, url: str, method: str, record: dict[str, Any]) -> Fetched:
        parts = urlsplit(url)
        refused = None
        if method != "get":
            refused = "previews only make GET calls (they never write)"
        elif parts.scheme and parts.scheme not in ("http", "https"):
            refused = "only http(s) URLs of this proxy can be previewed"
        elif parts.netloc and parts.netloc.lower() not in run.allowed_hosts:
            refused = f"{parts.netloc} is not this proxy; previews only call the proxy itself"
        elif not parts.path.startswith("/"):
            refused = "not a URL of this proxy"
        if refused:
            record["refused"] = refused
            return Fetched(0, {})
        return run.resolver(parts.path, dict(parse_qsl(parts.query)))


class ConnectedContentTag(Tag):
    name = "connected_content"
    block = False
    node_class = ConnectedContentNode

    def parse(self, stream: Any) -> ConnectedContentNode:
        token = stream.eat(TOKEN_TAG)
        if stream.current.kind != TOKEN_EXPRESSION:
            raise LiquidError("connected_content needs a URL", token=token)
        markup = stream.current.value
        return self.node_class(token, markup)


class AbortMessageNode(ast.Node):
    __slots__ = ("reason",)

    def __init__(self, token: Any, reason: str):
        super().__init__(token)
        self.reason = reason
        self.blank = False

    def __str__(self) -> str:
        return f'{{% abort_message("{self.reason}") %}}'

    def render_to_output(self, context: Any, buffer: TextIO) -> int:
        raise MessageAborted(self.reason)


class AbortMessageTag(Tag):
    name = "abort_message"
    block = False
    node_class = AbortMessageNode

    def parse(self, stream: Any) -> AbortMessageNode:
        token = stream.eat(TOKEN_TAG)
        expression = stream.current.value.strip() if stream.current.kind == TOKEN_EXPRESSION else "()"
        match = _ABORT.match(expression)
        if not match:
            raise LiquidError('abort_message takes ("a reason") or ()', token=token)
        return self.node_class(token, match.group(1) or match.group(2) or "")


def _json_escape(value: Any) -> str:
    return json.dumps(str(value))[1:-1]


class PreviewEnvironment(Environment):
    """A Liquid environment with Braze's tags and the filters we can match."""

    preview_run: PreviewRun

    def setup_tags_and_filters(self, *, extra: bool = False) -> None:
        super().setup_tags_and_filters(extra=extra)
        self.add_tag(ConnectedContentTag)
        self.add_tag(AbortMessageTag)
        self.add_filter("url_param_escape", lambda v: quote(str(v), safe=""))
        self.add_filter("json_escape", _json_escape)
        self.add_filter("property_accessor", lambda obj, key: obj.get(key) if isinstance(obj, dict) else None)


def braze_to_liquid(source: str) -> str:
    """`{{${user_id}}}` -> `{{braze_attributes.user_id}}`."""
    return BRAZE_ATTRIBUTE.sub(rf"{ATTRIBUTES_VAR}.\1", source)


def render_liquid(
    source: str, attributes: dict[str, Any], resolver: Resolver, allowed_hosts: set[str],
    environment: type[PreviewEnvironment] = PreviewEnvironment,
) -> dict[str, Any]:
    """Render a Braze message; the answer shape of POST /v1/preview/liquid. `environment`
    may carry resource limits (render_limits.LiquidLimits)."""
    env = environment()
    env.preview_run = PreviewRun(resolver, {h.lower() for h in allowed_hosts})
    aborted, reason, output = False, None, ""
    template = env.from_string(braze_to_liquid(source))
    try:
        output = template.render(**{ATTRIBUTES_VAR: attributes})
    except MessageAborted as abort:
        aborted, reason = True, abort.reason or "aborted by abort_message"
    return {"ok": True, "output": output, "aborted": aborted, "abort_reason": reason,
            "calls": env.preview_run.calls}

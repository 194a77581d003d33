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
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlsplit

from liquid import Environment, ast
from liquid.context import RenderContext
from liquid.exceptions import LiquidError
from liquid.tag import Tag
from liquid.token import TOKEN_EXPRESSION, TOKEN_TAG

from . import braze_filters
from .errors import MessageAborted
from .liquid_errors import inline_errors

# Braze writes profile attributes as ${name}; Liquid has no such syntax.
BRAZE_ATTRIBUTE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
ATTRIBUTES_VAR = "braze_attributes"
# Braze's attribute namespaces (its "supported personalization tags"):
# `custom_attribute.${Loyalty Tier}` and the like.
NAMESPACES = ("custom_attribute", "event_properties", "canvas_entry_properties", "campaign", "canvas",
              "api_trigger_properties", "context", "subscribed_state", "most_recently_used_device",
              "sms", "whats_app")
_NAMESPACED = re.compile(r"\b(" + "|".join(NAMESPACES) + r")\.\$\{([^}]+)\}")
_MARKUP = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)
_CONTENT_BLOCK = re.compile(r"\{\{\s*content_blocks\.\$\{([A-Za-z0-9_-]+)\}\s*\}\}")
_CONTENT_BLOCK_DEPTH = 10
_OPTION = re.compile(r"\s*:([A-Za-z_]+)")
# connected_content options Braze documents; others are reported on the call.
CC_OPTIONS = {"save": True, "basic_auth": True, "headers": True, "cache_max_age": True,
              "retry": False, "content_type": True, "method": True, "body": True, "no_cache": False}
_ABORT = re.compile(r"""^\(\s*(?:"([^"]*)"|'([^']*)')?\s*\)$""")


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
        url, options, problems = parse_options(markup)
        save = options.get("save")
        method = str(options.get("method") or "get").lower()
        record: dict[str, Any] = {"url": url, "save": save, "options": options}
        if problems:
            record["problems"] = problems
        started = time.perf_counter()
        fetched = self._fetch(run, url, method, record)
        record.update({"status": fetched.status, "cache": fetched.cache,
                       "ms": round((time.perf_counter() - started) * 1000, 2)})
        run.calls.append(record)
        if fetched.status >= 500 and "retry" in options:
            # Braze retries up to 5 times, then aborts the message (Connected Content docs).
            raise MessageAborted(f"connected_content {url} failed with {fetched.status} after :retry")
        if save:
            value = fetched.body
            if isinstance(value, dict):
                # Braze adds the status to a parsed JSON object.
                value = {**value, "__http_status_code__": fetched.status}
            context.assign(str(save), value)
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


def parse_options(markup: str) -> tuple[str, dict[str, Any], list[str]]:
    """`<url> :save x :headers {...} :retry` -> (url, {option: value}, problems)."""
    url, _, rest = markup.strip().partition(" ")
    options: dict[str, Any] = {}
    problems: list[str] = []
    position = 0
    while position < len(rest):
        match = _OPTION.match(rest, position)
        if not match:
            problems.append(f"unexpected text {rest[position:].strip()[:40]!r}")
            break
        name, position = match.group(1), match.end()
        if name not in CC_OPTIONS:
            problems.append(f"unknown option :{name}")
        value: Any = True
        if CC_OPTIONS.get(name, True):
            position = len(rest) - len(rest[position:].lstrip())
            if rest.startswith("{", position):
                try:
                    value, position = json.JSONDecoder().raw_decode(rest, position)
                except json.JSONDecodeError:
                    problems.append(f":{name} needs a JSON object")
                    break
            else:
                end = rest.find(" ", position)
                end = len(rest) if end < 0 else end
                value, position = rest[position:end], end
        options[name] = value
    if "cache_max_age" in options and not str(options["cache_max_age"]).isdigit():
        problems.append(":cache_max_age takes seconds")
    return url, options, problems


class PreviewEnvironment(Environment):
    """A Liquid environment with Braze's tags and the filters we can match."""

    preview_run: PreviewRun

    def setup_tags_and_filters(self, *, extra: bool = False) -> None:
        super().setup_tags_and_filters(extra=extra)
        self.add_tag(ConnectedContentTag)
        self.add_tag(AbortMessageTag)
        braze_filters.register(self)


def braze_to_liquid(source: str, blocks: Path | None = None) -> str:
    """`{{${user_id}}}` -> `{{braze_attributes.user_id}}`, `custom_attribute.${a b}` ->
    `custom_attribute["a b"]`, `{{content_blocks.${name}}}` -> the block's Liquid."""
    source = include_content_blocks(source, blocks)

    def liquid(markup: re.Match[str]) -> str:
        text = _NAMESPACED.sub(lambda m: f"{m.group(1)}[{json.dumps(m.group(2))}]", markup.group(0))
        return BRAZE_ATTRIBUTE.sub(rf"{ATTRIBUTES_VAR}.\1", text)

    # Only inside `{{ }}` and `{% %}`: Braze leaves `${first_name}` in plain text as it is.
    return _MARKUP.sub(liquid, source)


def include_content_blocks(source: str, blocks: Path | None, depth: int = 0) -> str:
    """Braze inlines a Content Block's Liquid where `{{content_blocks.${name}}}` stands; blocks
    are `<name>.liquid` files in `blocks` and may include others (at most 10 deep)."""

    def block(match: re.Match[str]) -> str:
        name = match.group(1)
        path = blocks / f"{name}.liquid" if blocks else None
        if path is None or not path.is_file():
            raise LiquidError(f"no content block named {name!r}", token=None)
        if depth >= _CONTENT_BLOCK_DEPTH:
            raise LiquidError("content blocks nested more than 10 deep", token=None)
        return include_content_blocks(path.read_text(encoding="utf-8"), blocks, depth + 1)

    return _CONTENT_BLOCK.sub(block, source)


def liquid_context(attributes: dict[str, Any]) -> dict[str, Any]:
    """The preview's attributes as Liquid variables: standard attributes under
    `braze_attributes`, namespaces (`custom_attribute`…) as objects, either nested
    (`{"custom_attribute": {"tier": "gold"}}`) or dotted (`{"custom_attribute.tier": "gold"}`)."""
    standard: dict[str, Any] = {}
    spaces: dict[str, dict[str, Any]] = {ns: {} for ns in NAMESPACES}
    for key, value in attributes.items():
        space, dot, name = str(key).partition(".")
        if space in spaces and dot:
            spaces[space][name] = value
        elif key in spaces and isinstance(value, dict):
            spaces[key].update(value)
        else:
            standard[key] = value
    return {ATTRIBUTES_VAR: standard, **spaces}


def render_liquid(
    source: str, attributes: dict[str, Any], resolver: Resolver, allowed_hosts: set[str],
    content_blocks: Path | None = None,
    environment: type[PreviewEnvironment] = PreviewEnvironment,
) -> dict[str, Any]:
    """Render a Braze message; the answer shape of POST /v1/preview/liquid. `environment`
    may carry resource limits (render_limits.LiquidLimits)."""
    env = environment()
    env.preview_run = PreviewRun(resolver, {h.lower() for h in allowed_hosts})
    aborted, reason, output = False, None, ""
    template = env.from_string(braze_to_liquid(source, content_blocks))
    inline_errors(template, RenderContext(template))
    try:
        output = template.render(**liquid_context(attributes))
    except MessageAborted as abort:
        aborted, reason = True, abort.reason or "aborted by abort_message"
    return {"ok": True, "output": output, "aborted": aborted, "abort_reason": reason,
            "calls": env.preview_run.calls}

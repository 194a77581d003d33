"""A Liquid linter for Braze messages over this proxy: what breaks in Braze or silently
renders empty, found by python-liquid's static analysis (`Template.analyze()` and the
syntax tree), never by pattern matching on the text.

Each warning is `{"line", "code", "message"}`:

- `hyphenated_key`: `exp.variants.checkout-button` reads a key the proxy never sends (its
  keys are identifiers: `checkout_button`), so it renders empty.
- `unknown_field`: a field the answer schema (the TypedDicts, as in the OpenAPI document)
  does not have; in an open map (`properties.*`, `variants.*`…) a key none of the previewed
  users' answers has.
- `string_number_comparison`: a string compared with a number: `<`/`>` render
  `Liquid error: comparison of String with … failed` in Braze, `==` is never true.
- `connected_content_no_save`: a JSON data endpoint called without `:save`, so Braze pastes
  the raw JSON into the message.
- `connected_content_other_host` / `connected_content_relative_url`: a call that does not
  reach this proxy from Braze.
- `missing_found_guard`: `recs.item_1` outside an `{% if recs.found %}` (or `item_count`)
  guard: empty for every recipient the upstream does not know.

Pure: no I/O. Content blocks are not linted (their tag is blanked so lines stay right).
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from liquid import ast
from liquid.builtin.expressions import Path
from liquid.builtin.expressions.logical import (
    EqExpression,
    GeExpression,
    GtExpression,
    LeExpression,
    LtExpression,
    NeExpression,
)
from liquid.builtin.expressions.primitive import FloatLiteral, IntegerLiteral, StringLiteral
from liquid.context import RenderContext

from .endpoints import Endpoint, build_registry
from .liquid_preview import (
    AbortMessageNode,
    ConnectedContentNode,
    PreviewEnvironment,
    braze_to_liquid,
    parse_options,
)

_CONTENT_BLOCK_TAG = re.compile(r"\{\{\s*content_blocks\.\$\{[^}]*\}\s*\}\}")
_LIQUID_IN_MARKUP = re.compile(r"\{\{.*?\}\}")
_ITEM = re.compile(r"^item_[0-9]+$")
_ORDERED = (LtExpression, GtExpression, LeExpression, GeExpression)
_COMPARISONS = (*_ORDERED, EqExpression, NeExpression)
# Liquid's own properties of arrays and strings.
_LIST_PROPERTIES = {"size", "first", "last"}
# Fields that make `x.item_N` safe to read: a guard on one of them says the list is there.
_GUARDS = {"found", "item_count", "items"}
# What Braze adds to every saved JSON object.
_BRAZE_FIELDS = {"__http_status_code__"}
_OPEN = object()  # a type whose keys are data, checked against the fetched answers


@dataclass(frozen=True)
class Warning:
    line: int
    code: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class Saved:
    """A variable saved by `connected_content`: which endpoint fills it."""

    name: str
    path: str  # the proxy path, e.g. /v1/amplitude/recommendations
    answer: Any  # its TypedDict, or None for a text answer


def lint(source: str, fetched: Mapping[str, list[Any]] | None = None,
         own_hosts: Iterable[str] = (), endpoints: Mapping[str, Endpoint] | None = None
         ) -> list[dict[str, Any]]:
    """Warnings for a Braze message. `fetched`: proxy path -> the JSON answers it gave the
    previewed users (open maps are checked against them); `own_hosts`: hosts that are this
    proxy; `endpoints`: the data endpoints by path (by default every public one: the render
    process has no app)."""
    liquid = braze_to_liquid(_CONTENT_BLOCK_TAG.sub('{{ "" }}', source))
    template = PreviewEnvironment().from_string(liquid)
    linter = _Linter(liquid, fetched or {}, {h.lower() for h in own_hosts}, RenderContext(template),
                     build_registry() if endpoints is None else endpoints)
    linter.connected_content(template.nodes)
    analysis = template.analyze(include_partials=False)  # Braze has no partials
    for variables in analysis.variables.values():
        for variable in variables:
            linter.variable(variable.segments, variable.span.index)
    linter.comparisons_and_guards(template.nodes, [])
    unique = sorted(set(linter.warnings), key=lambda w: (w.line, w.code, w.message))
    return [w.as_json() for w in unique]


def _walk_nodes(nodes: Iterable[ast.Node], static: RenderContext) -> Iterator[ast.Node]:
    for node in nodes:
        yield node
        yield from _walk_nodes(node.children(static, include_partials=False), static)


def _walk_expressions(expressions: Iterable[Any]) -> Iterator[Any]:
    for expression in expressions:
        yield expression
        yield from _walk_expressions(expression.children())


def _plain(segments: list[Any]) -> list[str | int] | None:
    """The path's segments when none is a variable subscript (`x[y]`), else None."""
    if any(isinstance(s, (list, Path)) for s in segments):
        return None
    return list(segments)


def _dotted(segments: Iterable[Any]) -> str:
    out = ""
    for s in segments:
        out += f"[{s}]" if isinstance(s, int) else (f".{s}" if out else str(s))
    return out


def _unwrap(tp: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return tp


class _Linter:
    def __init__(self, source: str, fetched: Mapping[str, list[Any]], own_hosts: set[str],
                 static: RenderContext, endpoints: Mapping[str, Endpoint]):
        self.source = source
        self.endpoints = endpoints
        self.static = static
        self.fetched = fetched
        self.own_hosts = own_hosts
        self.saved: dict[str, Saved] = {}
        self.aborting_guards: list[list[Any]] = []  # conditions that abort the message
        self.warnings: list[Warning] = []

    def line(self, index: int) -> int:
        return self.source.count("\n", 0, max(0, index)) + 1

    def warn(self, index: int, code: str, message: str) -> None:
        self.warnings.append(Warning(self.line(index), code, message))

    # connected_content: where it goes, what it saves
    def connected_content(self, nodes: Iterable[ast.Node]) -> None:
        for node in _walk_nodes(nodes, self.static):
            if not isinstance(node, ConnectedContentNode):
                continue
            index = node.token.start_index
            # Braze renders the markup's Liquid before reading it: stand in for each {{ … }}.
            url, options, _problems = parse_options(_LIQUID_IN_MARKUP.sub("{{_}}", node.markup))
            parts = urlsplit(url)
            path = parts.path
            if not url.startswith("{{") and not parts.netloc:
                self.warn(index, "connected_content_relative_url",
                          f"connected_content {path}: Braze needs the full URL of the proxy "
                          "(https://<host>/…); a relative URL only works in this preview")
            elif parts.netloc and "{{" not in parts.netloc and self.own_hosts \
                    and parts.netloc.lower() not in self.own_hosts:
                self.warn(index, "connected_content_other_host",
                          f"connected_content calls {parts.netloc}, not this proxy "
                          f"({', '.join(sorted(self.own_hosts))}): the preview cannot show its data, "
                          "and its answer is not the proxy's flat JSON")
                continue
            endpoint = self.endpoints.get(path)
            save = options.get("save")
            if endpoint is not None and not save:
                self.warn(index, "connected_content_no_save",
                          f"connected_content {path} has no :save, so Braze pastes its raw JSON into "
                          "the message; add :save <name> and read fields as {{<name>.field}}")
            if save and isinstance(save, str):
                self.saved[save] = Saved(save, path, endpoint.answer if endpoint else None)

    # variables: hyphens, fields the schema or the data do not have
    def variable(self, segments: list[Any], index: int) -> None:
        plain = _plain(segments)
        if not plain or str(plain[0]) not in self.saved or len(plain) < 2:
            return
        saved = self.saved[str(plain[0])]
        if saved.answer is None:
            return
        shown = _dotted(plain)
        hyphenated = [s for s in plain[1:] if isinstance(s, str) and "-" in s]
        if hyphenated:
            fixed = _dotted([s.replace("-", "_") if isinstance(s, str) else s for s in plain])
            self.warn(index, "hyphenated_key",
                      f"{shown}: the proxy's keys never contain '-' (Braze reads the key "
                      f"'{hyphenated[0]}' and renders nothing); write {fixed}")
            return
        tp: Any = saved.answer
        values: list[Any] = list(self.fetched.get(saved.path, []))
        for position, segment in enumerate(plain[1:], 1):
            where = _dotted(plain[: position + 1])
            if position == 1 and segment in _BRAZE_FIELDS:
                return
            tp = _unwrap(tp)
            values = [v[segment] if isinstance(v, dict) and segment in v
                      else v[segment] if isinstance(v, list) and isinstance(segment, int) and -len(v) <= segment < len(v)
                      else _MISSING for v in values]
            child = self.child_type(tp, segment)
            if child is None:
                self.warn(index, "unknown_field",
                          f"{where}: {saved.path} has no field {segment!r}, so it renders empty "
                          f"(its fields: {self.field_list(tp)})")
                return
            if child is _OPEN:
                present = [v for v in values if v is not _MISSING]
                if self.fetched.get(saved.path) and not present:
                    self.warn(index, "unknown_field",
                              f"{where}: not in the answer {saved.path} gave the previewed user(s), "
                              "so it renders empty for them")
                    return
                # below an open map, types follow the data
                tp = get_args(tp)[1] if get_origin(tp) is dict and get_args(tp) else Any
                if tp is Any:
                    return
                continue
            if child is Any:
                return
            tp = child

    @staticmethod
    def child_type(tp: Any, segment: str | int) -> Any:
        """The type of `tp[segment]`: a type, `_OPEN` (data decides), `Any`, or None (no such field)."""
        if tp is Any or tp is object:
            return Any
        origin = get_origin(tp)
        if typing.is_typeddict(tp):
            hints = get_type_hints(tp)
            if isinstance(segment, str) and segment in hints:
                return hints[segment]
            if segment in ("stale", "fallback"):
                return bool
            if isinstance(segment, str) and _ITEM.match(segment) and "item_count" in hints:
                return Any
            return None
        if origin is dict:
            return _OPEN
        if origin is list or tp is list:
            if isinstance(segment, int) or segment in ("first", "last"):
                args = get_args(tp)
                return args[0] if args else Any
            return int if segment == "size" else None
        if tp is str:
            return int if segment == "size" else (str if segment in ("first", "last") else None)
        return None

    @staticmethod
    def field_list(tp: Any) -> str:
        if typing.is_typeddict(tp):
            names = sorted(get_type_hints(tp))
            if "item_count" in names:
                names.append("item_1…item_N")
            return ", ".join(names)
        if get_origin(tp) is list or tp is list:
            return "size, first, last, [n]"
        return "size" if tp is str else "none"

    def value_kind(self, expression: Any) -> str | None:
        """'number' or 'string' when an operand's type is known (literal, schema or the data)."""
        if isinstance(expression, (IntegerLiteral, FloatLiteral)):
            return "number"
        if isinstance(expression, StringLiteral):
            return "string"
        if not isinstance(expression, Path):
            return None
        plain = _plain(expression.path)
        if not plain or str(plain[0]) not in self.saved:
            return None
        saved = self.saved[str(plain[0])]
        tp: Any = saved.answer
        values: list[Any] = list(self.fetched.get(saved.path, []))
        for segment in plain[1:]:
            values = [v.get(segment) if isinstance(v, dict) else None for v in values]
            if tp is None:
                continue
            tp = _unwrap(tp)
            child = self.child_type(tp, segment)
            if child is _OPEN:
                args = get_args(tp)
                child = args[1] if len(args) == 2 else Any
            tp = child
        if tp is str:
            return "string"
        if tp in (int, float):
            return "number"
        kinds = {("string" if isinstance(v, str) else "number" if isinstance(v, (int, float))
                  and not isinstance(v, bool) else None) for v in values if v is not None}
        return kinds.pop() if len(kinds) == 1 else None

    # comparisons and item_N guards need the tree: where a variable sits
    def comparisons_and_guards(self, nodes: Iterable[ast.Node], guards: list[list[Any]]) -> None:
        for node in nodes:
            expressions = list(_walk_expressions(node.expressions()))
            children = list(node.children(self.static, include_partials=False))
            for expression in expressions:
                if isinstance(expression, _COMPARISONS):
                    self.comparison(expression)
                if isinstance(expression, Path) and not children:
                    self.guard(expression, guards)
            # A block's own expressions (an if's condition, a for's collection) guard its body;
            # `{% if recs.found == false %}{% abort_message %}{% endif %}` guards what follows.
            paths = [e.path for e in expressions if isinstance(e, Path)]
            self.comparisons_and_guards(children, guards + paths)
            if children and any(isinstance(n, AbortMessageNode) for n in _walk_nodes(children, self.static)):
                self.aborting_guards.extend(paths)

    def comparison(self, expression: Any) -> None:
        left, right = self.value_kind(expression.left), self.value_kind(expression.right)
        if {left, right} != {"string", "number"}:
            return
        text = str(expression)
        string_side = expression.left if left == "string" else expression.right
        hint = ""
        if isinstance(string_side, Path):
            plain = _plain(string_side.path) or []
            if len(plain) == 3 and plain[1] == "profile":
                hint = f"; compare {plain[0]}.numbers.{plain[2]}, the number beside the string"
        effect = ("Braze renders 'Liquid error: comparison of String with … failed' into the message"
                  if isinstance(expression, _ORDERED) else "a string never equals a number, so this is never true")
        self.warn(expression.token.start_index, "string_number_comparison", f"{text}: {effect}{hint}")

    def guard(self, expression: Path, guards: list[list[Any]]) -> None:
        plain = _plain(expression.path)
        if not plain or str(plain[0]) not in self.saved or not isinstance(plain[-1], str) \
                or not _ITEM.match(plain[-1]):
            return
        prefix = plain[:-1]
        for guard in [*guards, *self.aborting_guards]:
            g = _plain(guard)
            if g and g[:-1] == prefix and (g[-1] in _GUARDS or (isinstance(g[-1], str) and _ITEM.match(g[-1]))):
                return
        shown, found = _dotted(plain), _dotted([*prefix, "found"])
        self.warn(expression.token.start_index, "missing_found_guard",
                  f"{shown} is read without a guard: for a user the upstream does not know it renders "
                  f"empty; wrap it in {{% if {found} %}}…{{% else %}}<fallback>{{% endif %}}")


_MISSING = object()

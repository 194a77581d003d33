"""Bounds on rendering, and the messages that name them.

Liquid previews (what a marketer, or anyone holding a key, posts) render on python-liquid's
own resource limits, set as the class attributes of an `Environment` subclass:
`loop_iteration_limit` (nested loops multiply), `output_stream_limit` (UTF-8 bytes),
`local_namespace_limit` (what `assign`/`capture` hold) and `context_depth_limit`. They run in
a separate process (`preview_pool.py`), which is what enforces their wall-clock budget:
python-liquid has none, so an overrunning render is killed, not asked to stop.

Message templates (`/v1/render/*`, the preview page) are deployed content on the send path,
rendered in the request's own greenlet (a normal render takes well under a millisecond).
jinja2's `ImmutableSandboxedEnvironment` keeps them from reaching Python internals and from
changing what they are given (the answers are the cache's own lists and mappings, shared
with every later answer of the send path: `items.append(...)` is refused); on top of it a
per-render budget is checked on every loop iteration (a call compiled into each `for` body),
every call (macros included: a macro that calls itself twice doubles its work per level)
and every output chunk: iterations in all, output characters and wall-clock time. So a
template typo that loops or recurses for ever is stopped after `CCPROXY_RENDER_TIMEOUT`
instead of holding its worker, and what can build a huge string from a short expression
(`*`, `**`, `%`, the filters `center`, `format`, `indent`, `join`, `replace` and `wordwrap`,
and the string methods that pad or format) is checked before it runs, so that one
expression cannot build a gigabyte string.

State: a budget lives in a ContextVar (per greenlet or thread, per render); nothing here is
shared between processes.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment
from liquid.exceptions import (
    BlockNestingError,
    ContextDepthError,
    LocalNamespaceLimitError,
    LoopIterationLimitError,
    OutputStreamLimitError,
    ResourceLimitError,
)

from .errors import RenderLimitExceeded
from .liquid_preview import PreviewEnvironment

# Templates nested (render/include, connected_content markup) deeper than this: python-liquid's default.
LIQUID_CONTEXT_DEPTH = 30
# Address space of a preview's render process: a render that builds huge values fails with
# a MemoryError instead of pushing the box into swap.
PREVIEW_MEMORY_BYTES = 512 << 20
# A power with a larger exponent (of a base other than -1, 0, 1) is refused in templates.
MAX_EXPONENT = 1000


@dataclass(frozen=True)
class LiquidLimits:
    """The bounds of one Liquid preview (sent to its render process as JSON)."""

    max_iterations: int
    max_output: int
    timeout: float
    context_depth: int = LIQUID_CONTEXT_DEPTH

    @classmethod
    def from_settings(cls, settings: Any) -> LiquidLimits:
        return cls(settings.preview_max_iterations, settings.preview_max_output, settings.preview_timeout)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def environment_class(self) -> type[PreviewEnvironment]:
        return _limited_environment(self.max_iterations, self.max_output, self.context_depth)

    def describe(self, exc: ResourceLimitError) -> str:
        """Which limit a render went over, and its value."""
        if isinstance(exc, LoopIterationLimitError):
            return (f"loop_iteration_limit: the message would loop more than {self.max_iterations} "
                    "times (nested loops multiply; CCPROXY_PREVIEW_MAX_ITERATIONS)")
        if isinstance(exc, OutputStreamLimitError):
            return (f"output_stream_limit: the output would be longer than {self.max_output} bytes "
                    "(CCPROXY_PREVIEW_MAX_OUTPUT)")
        if isinstance(exc, LocalNamespaceLimitError):
            return (f"local_namespace_limit: assigned and captured variables would hold more than "
                    f"{self.max_output} bytes (CCPROXY_PREVIEW_MAX_OUTPUT)")
        if isinstance(exc, ContextDepthError):
            return f"context_depth_limit: templates nest more than {self.context_depth} levels deep"
        if isinstance(exc, BlockNestingError):
            return f"block_nesting_limit: blocks nest more than {PreviewEnvironment.block_nesting_limit} levels deep"
        return f"resource limit: {exc}"

    def timeout_message(self) -> str:
        return (f"timeout: the render took longer than {self.timeout:g} s "
                "(CCPROXY_PREVIEW_TIMEOUT) and was stopped")

    @staticmethod
    def crash_message() -> str:
        return (f"crash: the render process ended without answering (over its {PREVIEW_MEMORY_BYTES >> 20} MB "
                "of memory, or killed); it is replaced")

    @staticmethod
    def memory_message() -> str:
        return (f"memory: the render needed more than {PREVIEW_MEMORY_BYTES >> 20} MB "
                "and was stopped")


@lru_cache(maxsize=16)
def _limited_environment(max_iterations: int, max_output: int, context_depth: int) -> type[PreviewEnvironment]:
    """python-liquid reads its limits from Environment class attributes."""
    return type("LimitedPreviewEnvironment", (PreviewEnvironment,), {
        "loop_iteration_limit": max_iterations,
        "output_stream_limit": max_output,
        "local_namespace_limit": max_output,
        "context_depth_limit": context_depth,
    })


@dataclass(frozen=True)
class TemplateLimits:
    """The bounds of one message template render."""

    max_iterations: int
    max_output: int
    timeout: float

    @classmethod
    def from_settings(cls, settings: Any) -> TemplateLimits:
        return cls(settings.render_max_iterations, settings.render_max_output, settings.render_timeout)


class RenderBudget:
    """What one template render has left; every check raises `RenderLimitExceeded`."""

    def __init__(self, filename: str, limits: TemplateLimits, clock: Callable[[], float] = time.monotonic):
        self.filename, self.limits, self.clock = filename, limits, clock
        self.deadline = clock() + limits.timeout
        self.iterations = 0
        self.output = 0

    def _exceeded(self, what: str) -> RenderLimitExceeded:
        return RenderLimitExceeded(f"{self.filename}: {what}", code="template_limit")

    def tick(self) -> None:
        self.iterations += 1
        if self.iterations > self.limits.max_iterations:
            raise self._exceeded(f"the template loops more than {self.limits.max_iterations} times "
                                 "(CCPROXY_RENDER_MAX_ITERATIONS)")
        self.check_time()

    def check_time(self) -> None:
        if self.clock() > self.deadline:
            raise self._exceeded(f"the render took longer than {self.limits.timeout:g} s "
                                 "(CCPROXY_RENDER_TIMEOUT) and was stopped")

    def too_long(self, what: str) -> RenderLimitExceeded:
        """`what` ("the output would be longer", "the filter join would write more") goes past
        the output limit."""
        return self._exceeded(f"{what} than {self.limits.max_output} characters (CCPROXY_RENDER_MAX_OUTPUT)")

    def add_output(self, size: int) -> None:
        self.output += size
        if self.output > self.limits.max_output:
            raise self.too_long("the output would be longer")
        self.check_time()


_budget: ContextVar[RenderBudget | None] = ContextVar("render_budget", default=None)


class _BudgetedCodeGenerator(CodeGenerator):
    """Compiles a budget check into the first line of every `for` body (recursive loops
    included: their body is the same code)."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        first = node.body[0] if node.body else None
        if not (isinstance(first, nodes.ExprStmt) and isinstance(first.node, nodes.Call)
                and isinstance(first.node.node, nodes.EnvironmentAttribute)
                and first.node.node.name == "ccproxy_tick"):
            tick = nodes.Call(nodes.EnvironmentAttribute("ccproxy_tick"), [], [], None, None)
            node.body.insert(0, nodes.ExprStmt(tick, lineno=node.lineno))
        super().visit_For(node, frame)

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: Any) -> str:
        # jinja works out `{{ 'x' | center(200000000) }}` while compiling when its arguments are
        # constants: outside any render's budget (800 MB before the first check). Only text
        # and literals are written out at compile time here; the rest runs under the budget.
        if not isinstance(node, (nodes.TemplateData, nodes.Const)):
            raise nodes.Impossible()
        return super()._output_child_to_const(node, frame, finalize)


# `%5d`, `%-.300s`, `%(name)20s`, `%*d`: the widths and precisions a printf-style format asks for.
_FORMAT_WIDTHS = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d+))?")
# `{:>20}`, `{0:.300}`; a width taken from the arguments (`{:>{}}`) nests a field in the spec.
_BRACE_WIDTHS = re.compile(r"\{[^{}]*:[^{}\d]*(\d*)(?:\.(\d+))?[^{}]*\}")
_NESTED_SPEC = re.compile(r"\{[^{}]*:[^{}]*\{")
UNSIZED = sys.maxsize  # a width that comes from the arguments: refused rather than sized


def _format_size(text: Any) -> int:
    """The least a printf-style format of `text` writes (its widths and precisions count)."""
    if not isinstance(text, str):
        return 0
    pairs = _FORMAT_WIDTHS.findall(text)
    if any("*" in pair for pair in pairs):
        return UNSIZED
    return len(text) + sum(int(n) for pair in pairs for n in pair if n)


def _brace_format_size(text: str) -> int:
    """The same for `str.format`'s replacement fields."""
    if _NESTED_SPEC.search(text):
        return UNSIZED
    return len(text) + sum(int(n) for pair in _BRACE_WIDTHS.findall(text) for n in pair if n)


def _method_size(owner: str, name: str, args: tuple[Any, ...]) -> int:
    """What a string method called from a template would build, when it pads or formats."""
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        return max(len(owner), args[0])
    return 0


def _as_int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _checked(name: str, size: Callable[..., int], original: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that first works out the least it would write (`size`, given the filter's
    own arguments) and refuses past the render's output limit, before building it."""

    passed = 1 if getattr(original, "jinja_pass_arg", None) is not None else 0  # eval_ctx/env first

    @functools.wraps(original)  # keeps jinja's pass_eval_context marker
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget.get()
        if budget is not None:
            if name == "join" and len(args) > passed:  # a generator is read once: size the list
                args = (*args[:passed], list(args[passed]), *args[passed + 1:])
            if size(*args[passed:], **kwargs) > budget.limits.max_output:
                raise budget.too_long(f"the filter {name} would write more")
        return original(*args, **kwargs)

    return bounded


def _join_size(value: Any, d: str = "", attribute: Any = None) -> int:
    items = value if isinstance(value, list) else []
    return len(_text(d)) * max(0, len(items) - 1) + sum(len(_text(item)) for item in items)


def _replace_size(s: Any, old: Any, new: Any, count: Any = None) -> int:
    text, old, new = _text(s), _text(old), _text(new)
    found = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * max(0, len(new) - len(old))


def _indent_size(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> int:
    pad = len(width) if isinstance(width, str) else _as_int(width)
    return len(_text(s)) + pad * (_text(s).count("\n") + 1)


def _wordwrap_size(s: Any, width: Any = 79, break_long_words: bool = True, wrapstring: Any = None,
                   break_on_hyphens: bool = True) -> int:
    text = _text(s)
    return len(text) + (len(text) // max(1, _as_int(width, 79)) + 1) * len(_text(wrapstring or "\n"))


_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda value, width=80: max(len(_text(value)), _as_int(width)),
    "format": lambda value, *args, **kwargs: _format_size(value),
    "indent": _indent_size,
    "join": _join_size,
    "replace": _replace_size,
    "wordwrap": _wordwrap_size,
}


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """A sandboxed Jinja environment whose renders are bounded by a `RenderBudget` and cannot
    change the values they are given (cached answers)."""

    code_generator_class = _BudgetedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, *args: Any, **kwargs: Any):
        # jinja's optimizer, too, would run filters with constant arguments while compiling.
        kwargs.setdefault("optimized", False)
        super().__init__(*args, **kwargs)
        for name, size in _SIZES.items():
            self.filters[name] = _checked(name, size, self.filters[name])

    def ccproxy_tick(self) -> None:
        budget = _budget.get()
        if budget is not None:
            budget.tick()

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Every call of a template (functions, methods, macros): the clock first, and a
        result past the output limit refused before it is used again (a macro that doubles
        its text per level)."""
        budget = _budget.get()
        if budget is not None:
            budget.check_time()
            owner = getattr(obj, "__self__", None)
            if isinstance(owner, str) and _method_size(owner, getattr(obj, "__name__", ""), args) \
                    > budget.limits.max_output:
                raise budget.too_long("a string method would write more")
        result = super().call(context, obj, *args, **kwargs)
        if budget is not None and isinstance(result, str) and len(result) > budget.limits.max_output:
            raise budget.too_long("a value would be longer")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`'{:>20}'.format(x)` (jinja hands templates its own wrapper): sized first too."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text = value.__self__

        def sized(*args: Any, **kwargs: Any) -> str:
            budget = _budget.get()
            if budget is not None and _brace_format_size(text) > budget.limits.max_output:
                raise budget.too_long("a string method would write more")
            return wrapped(*args, **kwargs)

        return sized

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget.get()
        if operator == "*" and budget is not None:
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                        and len(seq) * times > budget.limits.max_output:
                    raise budget.too_long("a repetition would be longer")
        if operator == "%" and budget is not None and _format_size(left) > budget.limits.max_output:
            raise budget.too_long("a format would be longer")
        if operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)) \
                and abs(left) > 1 and right > MAX_EXPONENT:
            raise RenderLimitExceeded(f"an exponent larger than {MAX_EXPONENT} is refused",
                                      code="template_limit")
        return super().call_binop(context, operator, left, right)

    def render_bounded(self, filename: str, context: dict[str, Any], limits: TemplateLimits,
                       clock: Callable[[], float] = time.monotonic) -> str:
        """Render `filename` within `limits`: output and time are checked chunk by chunk."""
        template = self.get_template(filename)
        budget = RenderBudget(filename, limits, clock)
        token = _budget.set(budget)
        try:
            return "".join(_bounded(template.generate(context), budget))
        finally:
            _budget.reset(token)


def _bounded(chunks: Iterable[str], budget: RenderBudget) -> Iterable[str]:
    for chunk in chunks:
        budget.add_output(len(chunk))
        yield chunk

"""Render errors inline, as Ruby Liquid (the engine family Braze runs) does.

Ruby Liquid, in its default lax mode, replaces the one node that failed with
`Liquid error: <message>` and goes on rendering; python-liquid raises. `inline_errors`
wraps every node of a parsed template so the preview shows what a recipient would get.
Comparison errors use Ruby's wording (`comparison of String with 2000 failed`).
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any, TextIO

from liquid import ast
from liquid.builtin.expressions.logical import (
    GeExpression,
    GtExpression,
    LeExpression,
    LtExpression,
)
from liquid.exceptions import LiquidError, LiquidTypeError, ResourceLimitError

_ORDERED = (LtExpression, GtExpression, LeExpression, GeExpression)
_RUBY_CLASS = {str: "String", int: "Integer", float: "Float", Decimal: "BigDecimal", bool: "TrueClass",
               dict: "Hash", list: "Array", type(None): "NilClass"}


def ruby_class(value: Any) -> str:
    if value is False:
        return "FalseClass"
    return _RUBY_CLASS.get(type(value), type(value).__name__)


def _ruby_operand(value: Any) -> str:
    """Ruby's rb_cmperr: an immediate value (number, nil, true/false) by its inspect, else its class."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, Decimal)):
        return str(value)
    return ruby_class(value)


def _comparable(left: Any, right: Any) -> bool:
    numbers = (int, float, Decimal)
    if left is None or right is None:
        return True
    if isinstance(left, str) and isinstance(right, str):
        return True
    return isinstance(left, numbers) and isinstance(right, numbers) and not isinstance(left, bool) \
        and not isinstance(right, bool)


def _walk(expressions: Iterable[Any]) -> Iterable[Any]:
    for expression in expressions:
        yield expression
        yield from _walk(expression.children())


def ruby_message(node: ast.Node, context: Any, error: LiquidError) -> str:
    """The message Ruby Liquid would print for `error` raised while rendering `node`."""
    if isinstance(error, LiquidTypeError):
        for expression in _walk(node.expressions()):
            if isinstance(expression, _ORDERED):
                try:
                    left, right = expression.left.evaluate(context), expression.right.evaluate(context)
                except LiquidError:
                    continue
                if not _comparable(left, right):
                    return f"comparison of {ruby_class(left)} with {_ruby_operand(right)} failed"
    return getattr(error, "message", None) or str(error).splitlines()[0]


class InlineErrorNode(ast.Node):
    """One node whose render errors become `Liquid error: …` in the output."""

    __slots__ = ("node",)

    def __init__(self, node: ast.Node):
        super().__init__(node.token)
        self.node = node
        self.blank = node.blank

    def __str__(self) -> str:
        return str(self.node)

    def render_to_output(self, context: Any, buffer: TextIO) -> int:
        try:
            return self.node.render(context, buffer)
        except ResourceLimitError:
            raise  # limits stop the render; they are not the template's content
        except LiquidError as error:
            return buffer.write(f"Liquid error: {ruby_message(self.node, context, error)}")
        except (ValueError, OverflowError, ArithmeticError) as error:
            # Python refusing a value Ruby would take (a year past 9999, a 5,000-digit
            # number): shown where it happened, as Liquid shows a filter's error.
            return buffer.write(f"Liquid error: {error}")

    def children(self, static_context: Any, *, include_partials: bool = True) -> Iterable[ast.Node]:
        yield self.node

    def expressions(self) -> Iterable[Any]:
        return self.node.expressions()


def inline_errors(template: Any, static_context: Any) -> None:
    """Wrap every node of `template` (at every depth) in an InlineErrorNode."""
    template.nodes = [InlineErrorNode(node) for node in template.nodes]
    pending = [wrapper.node for wrapper in template.nodes]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.BlockNode):
            node.nodes = [InlineErrorNode(child) for child in node.nodes]
        for child in node.children(static_context, include_partials=False):
            pending.append(child.node if isinstance(child, InlineErrorNode) else child)

"""How deep a JSON value may nest, for every JSON the proxy reads from outside (upstream
answers, query parameters): far deeper is broken or hostile, and would overflow Python's
recursion in the shapers, encoders and evaluation engines (a 500) if let through."""

from __future__ import annotations

from typing import Any

# Vendor answers and contexts nest a handful of levels.
MAX_DEPTH = 64


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests objects/arrays more than `limit` levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if type(node) is dict else node if type(node) is list else ()
        for child in children:
            if type(child) is dict or type(child) is list:
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False

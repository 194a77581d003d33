"""Every exception class of the proxy lives in proxy/errors.py; the old import paths stay."""

from __future__ import annotations

import importlib
import pkgutil

import proxy
from proxy import errors


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_all_subclasses(sub)}
    return found


def test_every_exception_class_is_in_errors_py():
    for module in pkgutil.walk_packages(proxy.__path__, "proxy."):
        if not module.name.startswith("proxy.sandbox"):  # the fake upstreams are not the proxy
            importlib.import_module(module.name)
    outside = sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in _all_subclasses(BaseException)
                     if cls.__module__.startswith("proxy.") and cls.__module__ != "proxy.errors"
                     and not cls.__module__.startswith("proxy.sandbox"))
    assert outside == []


def test_the_old_names_still_import():
    from proxy.auth import Unauthorized
    from proxy.clients.base import _Retryable
    from proxy.config import SettingsError
    from proxy.guards import CircuitOpen
    from proxy.links import LinkError
    from proxy.liquid_preview import MessageAborted
    from proxy.rendering import TemplateError
    from proxy.writes.pixel import PixelRefused

    assert (Unauthorized, CircuitOpen, TemplateError, LinkError, SettingsError, MessageAborted,
            PixelRefused, _Retryable) == (
        errors.Unauthorized, errors.CircuitOpen, errors.TemplateError, errors.LinkError,
        errors.SettingsError, errors.MessageAborted, errors.PixelRefused, errors.Retryable)


def test_errors_answer_with_their_status_and_headers():
    assert errors.Unauthorized("no").headers()["WWW-Authenticate"].startswith("Basic")
    assert errors.MethodNotAllowed(["GET", "HEAD", "GET"]).headers() == {"Allow": "GET, HEAD"}
    assert errors.BodyTooLarge(10).status == 413 and "10 bytes" in errors.BodyTooLarge(10).message
    assert issubclass(errors.CircuitOpen, errors.TransientError) and errors.CircuitOpen("a", "b").status == 503
    assert errors.InternalError().body()["error"]["code"] == "internal_error"
    assert errors.OutboxUnavailable("full").status == 503


def test_every_error_code_the_proxy_answers_is_in_the_readme_table():
    """A template author reads `error.code`: each one the proxy can answer is documented."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    source = "\n".join(p.read_text() for p in (root / "proxy").rglob("*.py") if "sandbox" not in p.parts)
    codes = set(re.findall(r'\bcode ?= ?"([a-z_]+)"', source))
    codes |= set(re.findall(r'^\s+\d{3}: \("([a-z_]+)",', (root / "proxy" / "connections.py").read_text(), re.M))
    codes -= {"write_misdirected"}  # a dead letter's reason, never an HTTP answer
    errors = Path(root / "README.md").read_text().split("### Errors", 1)[1].split("\n### ", 1)[0]
    assert sorted(code for code in codes if f"`{code}`" not in errors) == []

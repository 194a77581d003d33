"""Message templates: the catalogue in `templates/catalog.toml`, a Jinja environment, and
rendering a template with data fetched through the same cached endpoints as the JSON API.

Template names come only from the catalogue, so no name can reach a file outside
`templates/`. Templates render in jinja2's sandbox within the bounds of `render_limits`
(loop iterations, output size, time): a runaway template is a 422 `template_limit`.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from .endpoints import Call, call
from .errors import NotFound, RenderLimitExceeded, TemplateError
from .render_limits import BoundedEnvironment, TemplateLimits

if TYPE_CHECKING:
    from .services import Services

FORMATS = {"html": ".html", "text": ".txt"}
_NAME = re.compile(r"^[a-z0-9_]{1,64}$")


@dataclass(frozen=True)
class MessageTemplate:
    name: str
    description: str
    params: list[str]
    defaults: dict[str, str]
    data: dict[str, str]
    fallback: dict[str, Any]
    liquid: str = ""
    preview: list[dict[str, str]] = field(default_factory=list)
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    braze: dict[str, str] = field(default_factory=dict)  # parameter -> Braze expression

    def listing(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "formats": self.formats,
            "params": self.params, "defaults": self.defaults, "data": self.data,
            "preview_users": self.preview,
        }


def default_templates_dir() -> Path:
    """The repository's `templates/` next to the package (a checkout), else the copy a
    regular install puts in `<prefix>/share/connected-content-proxy/templates`, else
    `./templates`."""
    for candidate in (
        Path(__file__).resolve().parent.parent / "templates",
        Path(sys.prefix) / "share" / "connected-content-proxy" / "templates",
    ):
        if (candidate / "catalog.toml").is_file():
            return candidate
    return Path.cwd() / "templates"


class TemplateLibrary:
    """The catalogue plus a Jinja environment over the templates directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.templates = self._read_catalog(directory / "catalog.toml")
        self.env = BoundedEnvironment(
            loader=jinja2.FileSystemLoader(str(directory)),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
            # Missing data renders empty instead of failing a send; typos show in previews.
            undefined=jinja2.ChainableUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
        )

    @staticmethod
    def _read_catalog(path: Path) -> dict[str, MessageTemplate]:
        if not path.is_file():
            return {}
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
        templates = {}
        for name, spec in raw.items():
            if not _NAME.match(name):
                continue
            formats = [f for f, ext in FORMATS.items() if (path.parent / f"{name}{ext}").is_file()]
            templates[name] = MessageTemplate(
                name=name,
                description=spec.get("description", ""),
                params=list(spec.get("params", [])),
                defaults={k: str(v) for k, v in spec.get("defaults", {}).items()},
                data=dict(spec.get("data", {})),
                fallback=dict(spec.get("fallback", {})),
                liquid=spec.get("liquid", "").strip(),
                preview=[{k: str(v) for k, v in user.items()} for user in spec.get("preview", [])],
                formats=formats,
                braze={k: str(v) for k, v in spec.get("braze", {}).items()},
            )
        return templates

    def get(self, name: str) -> MessageTemplate:
        template = self.templates.get(name) if _NAME.match(name or "") else None
        if template is None:
            raise NotFound(f"no message template named {name!r}", code="unknown_template")
        return template


@dataclass
class Rendered:
    template: MessageTemplate
    output: dict[str, str]  # format -> text
    calls: dict[str, Call]  # data name -> the endpoint call that filled it

    @property
    def max_age(self) -> float:
        ages = [c.max_age for c in self.calls.values() if c.max_age is not None]
        return min(ages) if ages else 0.0

    @property
    def cache(self) -> str:
        states = {c.cache for c in self.calls.values()}
        return "HIT" if states == {"HIT"} else "MISS"


def template_args(template: MessageTemplate, args: Mapping[str, str]) -> dict[str, str]:
    """The request's parameters over the template's defaults."""
    merged = dict(template.defaults)
    merged.update({k: v for k, v in args.items() if v != ""})
    return merged


def render(
    library: TemplateLibrary,
    services: Services,
    name: str,
    args: Mapping[str, str],
    formats: list[str],
    globals_: Mapping[str, Callable[..., Any]] | None = None,
) -> Rendered:
    """Fetch the template's data (cached, shared with the JSON API) and render `formats`."""
    template = library.get(name)
    merged = template_args(template, args)
    calls = {data_name: call(services, path, merged) for data_name, path in template.data.items()}
    context: dict[str, Any] = {data_name: c.body for data_name, c in calls.items()}
    context.update({"params": merged, "fallback": template.fallback})
    context.update(globals_ or {})
    output = {}
    for fmt in formats:
        if fmt not in template.formats:
            raise NotFound(f"template {name!r} has no {fmt} form", code="unknown_format")
        output[fmt] = _render_file(library, f"{name}{FORMATS[fmt]}", context,
                                   TemplateLimits.from_settings(services.settings))
    return Rendered(template, output, calls)


def _render_file(library: TemplateLibrary, filename: str, context: dict[str, Any],
                 limits: TemplateLimits) -> str:
    try:
        return library.env.render_bounded(filename, context, limits).strip() + "\n"
    except RenderLimitExceeded:
        raise
    except jinja2.TemplateSyntaxError as exc:  # in this file or one it includes: name that one
        raise TemplateError(exc.name or filename, exc.lineno, exc.message or "syntax error") from None
    except jinja2.TemplateNotFound as exc:
        if exc.name != filename:  # a deployed template includes a file that is not there
            raise TemplateError(filename, _template_line(filename)[1], f"it includes {exc.name}, which is missing"
                                ) from None
        raise NotFound(f"template file {filename} is missing", code="unknown_template") from None
    except Exception as exc:  # a runtime error inside the template (or one it includes)
        where, line = _template_line(filename)
        raise TemplateError(where, line, f"{type(exc).__name__}: {exc}") from None


def _template_line(filename: str) -> tuple[str, int | None]:
    """The template file and line of the current exception, deepest first (Jinja rewrites
    tracebacks to show template lines): an error in an included file names that file."""
    tb = sys.exc_info()[2]
    where, line = filename, None
    while tb is not None:
        code_file = tb.tb_frame.f_code.co_filename
        if code_file.endswith((".html", ".txt", ".liquid", ".j2")):
            where, line = Path(code_file).name, tb.tb_lineno
        tb = tb.tb_next
    return where, line

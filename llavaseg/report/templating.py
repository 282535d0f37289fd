"""Jinja2 environments over the package's ``templates/``: HTML pages (autoescaped) and Markdown (``md`` filter)."""

from __future__ import annotations

import html
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import quote

import jinja2


def md_text(text: Any) -> str:
    """Inline Markdown text: HTML-escaped, Markdown marks backslash-escaped, on one line."""
    escaped = html.escape(" ".join(str(text).split()), quote=False)
    return "".join("\\" + ch if ch in "\\`*_[]|#" else ch for ch in escaped)


def url(path: Any) -> str:
    """A relative link, percent-encoded (the HTML page escapes it again as an attribute)."""
    return quote(str(path))


@cache
def _environment(markdown: bool) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("llavaseg.report", "templates"),
        autoescape=not markdown,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["md"] = md_text
    environment.filters["url"] = url
    return environment


def render(name: str, **context: Any) -> str:
    """Render ``templates/<name>``; ``*.md.j2`` without HTML autoescaping (its texts go through ``| md``)."""
    return _environment(name.endswith(".md.j2")).get_template(name).render(**context)


def template_text(name: str) -> str:
    """A static file of ``templates/`` as it is (the viewer's script)."""
    return resources.files("llavaseg.report").joinpath("templates", name).read_text(encoding="utf-8")

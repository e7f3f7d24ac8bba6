"""Helpers shared by the CLI commands: the lazily opened site, parsing, formatting."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import click

from ..api import Site


class Context:
    """Per-invocation state: the ``--site`` option and the site, opened on first use."""

    def __init__(self, site_path: str | None) -> None:
        self.site_path = site_path
        self._site: Site | None = None

    def site(self) -> Site:
        if self._site is None:
            self._site = Site.open(self.site_path)
        return self._site


pass_ctx = click.make_pass_decorator(Context)


def parse_pairs(values: Iterable[str], option: str) -> dict[str, str]:
    """``["K=V", ...]`` -> ``{K: V}``; a pair without '=' is a usage error."""
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        pairs[key] = value
    return pairs


def fmt_time(epoch: float | None) -> str:
    """Local time with milliseconds, or '-'."""
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """An aligned plain-text table; the last column is not padded."""
    cells = [[str(c) for c in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def setup_logging(verbose: bool) -> None:
    """Log lines with time, level and module on stderr (every step with *verbose*)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

"""The one renderer: every table, key-value panel and `--json` output of xq goes through here.

Readouts are data first (dataclasses and dicts built elsewhere), rendering second. Tables never
truncate numbers: rich columns do not wrap or cut cells, and a console that is not a terminal
renders as wide as the table needs.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Sequence

from xqcli import __version__

JSON_SCHEMA_VERSION = 1
FORMATS = ("table", "md", "csv", "json")


def envelope(tool: str, data: dict[str, Any], schema_version: int = JSON_SCHEMA_VERSION) -> dict[str, Any]:
    """Every `--json` object starts with the same three keys: its schema version, the command, the xq version."""
    return {"schema_version": schema_version, "tool": f"xq {tool}", "xq_version": __version__} | data


def dumps(tool: str, data: dict[str, Any], schema_version: int = JSON_SCHEMA_VERSION) -> str:
    """One JSON object, envelope first, for stdout."""
    return json.dumps(envelope(tool, data, schema_version), indent=2, default=str)


def key_value_table(title: str | None, rows: Sequence[tuple[str, str]]):
    """A two-column rich table (label, value) for panels and summaries."""
    from rich.table import Table

    t = Table(title=title, show_header=False, box=None, title_justify="left", pad_edge=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    for key, val in rows:
        t.add_row(key, val)
    return t


def rich_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None,
               numeric: Sequence[bool] | None = None):
    """A rich table whose cells are never wrapped or cut (numbers stay whole whatever the width)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        right = numeric[i] if numeric is not None else i > 0
        t.add_column(c, justify="right" if right else "left", no_wrap=True, overflow="ignore")
    for r in rows:
        t.add_row(*(str(v) for v in r))
    return t


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def csv_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def print_table(console, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> None:
    """Print a table on a rich console as wide as it needs, terminal or pipe (no ellipses, no wrapping)."""
    table = rich_table(columns, rows, title=title)
    width = console.measure(table).maximum
    console.print(table, width=max(width, console.width) if console.is_terminal else width)

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
    """Every `--json` object starts with the same three keys: schema version, command, xq version."""
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
               caption: str | None = None, numeric: Sequence[bool] | None = None):
    """A rich table whose cells are never wrapped or cut (numbers stay whole whatever the width).

    `numeric` right-aligns columns (default: every column but the first)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for c, right in zip(columns, _right_aligned(len(columns), numeric), strict=True):
        t.add_column(c, justify="right" if right else "left", no_wrap=True, overflow="ignore")
    for r in rows:
        t.add_row(*(str(v) for v in r))
    return t


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   numeric: Sequence[bool] | None = None) -> str:
    """A GitHub markdown table; `numeric` columns are right-aligned (`---:`; default: all but the first)."""
    align = ["---:" if r else "---" for r in _right_aligned(len(columns), numeric)]
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def csv_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV with a header line; None cells are empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def jsonl(tool: str, records: Sequence[dict[str, Any]], schema_version: int = JSON_SCHEMA_VERSION) -> str:
    """One enveloped JSON object per line (for log files that grow run by run)."""
    return "".join(json.dumps(envelope(tool, r, schema_version), default=str) + "\n" for r in records)


def _right_aligned(n_columns: int, numeric: Sequence[bool] | None) -> Sequence[bool]:
    """Numbers align right; by default every column but the first (the row label) holds numbers."""
    return numeric if numeric is not None else [i > 0 for i in range(n_columns)]


def show(console, renderable) -> None:
    """Print on a rich console as wide as the renderable needs, terminal or pipe (no ellipses, no wraps)."""
    width = console.measure(renderable).maximum
    console.print(renderable, width=max(width, console.width) if console.is_terminal else width)


def plain_text(renderable) -> str:
    """A rich renderable as plain text, as wide as it needs (for files and `--format table` output)."""
    from rich.console import Console

    width = Console(file=io.StringIO(), width=100_000).measure(renderable).maximum
    console = Console(record=True, file=io.StringIO(), width=width)
    console.print(renderable)
    return console.export_text()


def print_table(console, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                title: str | None = None) -> None:
    """Print a table on a rich console as wide as it needs, terminal or pipe (no ellipses, no wrapping)."""
    show(console, rich_table(columns, rows, title=title))

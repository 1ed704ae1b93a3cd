"""The one renderer: every table, key-value panel and `--json` output of xq goes through here.

Readouts are data first (dataclasses and dicts built elsewhere), rendering second. Tables never
truncate numbers: rich columns do not wrap or cut cells, and `show` prints as wide as the table needs,
on a terminal or in a pipe (where rich would otherwise fit it into 80 columns). A command's report is
a list of text lines and `TableData`, printed by `emit` in any `--format` (`choose_format`).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

from xqcli import __version__
from xqcli.errors import InputError, ResourceError

JSON_SCHEMA_VERSION = 1
FORMATS = ("table", "md", "csv", "json")


def check_output_file(path: Path, option: str) -> None:
    """Refuse an output path that cannot be written, before the work whose results it would hold."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder", hint=f"give a file name, e.g. {option} {path / 'results.md'}")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{option} {path}: the folder {folder} does not exist", hint="create it first")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{option} {path} is not writable here", hint="choose another path")


def write_output_file(path: Path, text: str, option: str) -> None:
    """Write a results file; an I/O error is bad input (2), a full disk does not fit (7)."""
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        cls = ResourceError if e.errno == errno.ENOSPC else InputError
        raise cls(f"cannot write {option} {path}: {e.strerror or e}", hint="choose another path") from None


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
        t.add_column(c, justify="right" if right else "left", no_wrap=True)
    for r in rows:
        t.add_row(*(str(v) for v in r))
    return t


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   numeric: Sequence[bool] | None = None) -> str:
    """A GitHub markdown table; `numeric` columns are right-aligned (`---:`; default: all but the first). A `|` in
    a header or cell (inspect's `max |X|`) is written `\\|`, else it would split the cell and break the table."""
    align = ["---:" if r else "---" for r in _right_aligned(len(columns), numeric)]
    out = [_markdown_row(columns), "|" + "|".join(align) + "|"]
    out += [_markdown_row(r) for r in rows]
    return "\n".join(out) + "\n"


def _markdown_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(v).replace("|", "\\|") for v in cells) + " |"


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
    """Print on a rich console as wide as the renderable needs, terminal or pipe (no ellipses, no wraps): rich
    fits a table into the console's width (80 columns when it is not a terminal) by cutting cells."""
    from rich.console import Console

    needed = _natural_width(renderable)
    width = max(needed, console.width) if console.is_terminal else needed
    wide = Console(file=console.file, width=width, color_system=console.color_system,
                   force_terminal=console.is_terminal, highlight=False)
    wide.print(renderable)


def _natural_width(renderable) -> int:
    """The width a renderable takes with no limit."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=100_000).measure(renderable).maximum


def plain_text(renderable) -> str:
    """A rich renderable as plain text, as wide as it needs (for files and `--format table` output)."""
    from rich.console import Console

    console = Console(record=True, file=io.StringIO(), width=_natural_width(renderable))
    console.print(renderable)
    return console.export_text()


@dataclass(frozen=True)
class TableData:
    """A table as data, for `emit` to render in any of `FORMATS` but json. `numeric`: as in `rich_table`.
    `csv_columns`/`csv_rows`, where given, are what CSV writes instead of the displayed cells: plain numbers a
    spreadsheet reads (build both with `table`, so they cannot drift)."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    title: str | None = None
    numeric: Sequence[bool] | None = None
    csv_columns: Sequence[str] | None = None
    csv_rows: Sequence[Sequence[Any]] | None = None


@dataclass(frozen=True)
class Column:
    """A column of a `table`: its header, how a raw value shows in table and markdown (None shows as "-"),
    and its CSV headers where they differ: one with the unit CSV's raw value is in ("fixed (bytes)", "top-1
    (fraction)"), or several that a tuple value spreads over (one number per CSV cell). `to_csv`: the number
    CSV writes of a value that carries more (passkey's cell: its accuracy, beside a mark for display)."""

    name: str
    show: Callable[[Any], str] = str
    csv: tuple[str, ...] = ()
    numeric: bool = True
    to_csv: Callable[[Any], Any] | None = None


def table(columns: Sequence[Column], values: Sequence[Sequence[Any]], *,
          title: str | None = None) -> TableData:
    """A `TableData` from raw values, one per column in each row: the displayed cells are `Column.show` of
    them, the CSV cells the values themselves (None an empty cell). CSV rule, as in `--json`: sizes in bytes,
    ratios as plain floats, percentages as fractions (0..1) with "(fraction)" in the header."""
    csv_columns = [name for c in columns for name in (c.csv or (c.name,))]
    shown, raw = [], []
    for row in values:
        shown.append(["-" if v is None else c.show(v) for c, v in zip(columns, row, strict=True)])
        raw.append([x for c, v in zip(columns, row, strict=True) for x in _spread(c, v)])
    return TableData([c.name for c in columns], shown, title=title, numeric=[c.numeric for c in columns],
                     csv_columns=csv_columns, csv_rows=raw)


def count(value: float) -> str:
    """A whole number as displayed (bytes per token, tokens): thousands separated, "6,180"."""
    return f"{value:,.0f}"


# columns that plan, inspect, eval and passkey share, shown alike
BYTES_PER_TOKEN = Column("bytes/token", count)
VS_FP16_KV = Column("vs fp16 KV", "{:.3f}".format)  # bytes over fp16 KV's
COMPRESSION = Column("compression", "{:.2f}x".format)  # fp16 KV's bytes over the row's


def _spread(column: Column, value: Any) -> Sequence[Any]:
    """A value's CSV cells: a tuple over a column's several CSV headers (None: all empty), else itself."""
    if value is not None and column.to_csv is not None:
        value = column.to_csv(value)
    if len(column.csv) < 2:
        return (value,)
    cells = (None,) * len(column.csv) if value is None else tuple(value)
    if len(cells) != len(column.csv):
        raise ValueError(f"column {column.name!r}: {len(cells)} values for {len(column.csv)} CSV headers")
    return cells


def fraction(name: str) -> tuple[str, ...]:
    """The CSV header of a percentage column, whose CSV cells are fractions."""
    return (f"{name} (fraction)",)


def in_bytes(name: str) -> tuple[str, ...]:
    """The CSV header of a size column displayed with a unit (`format_bytes`), whose CSV cells are bytes."""
    return (f"{name} (bytes)",)


Part = Union[str, TableData]  # a report is lines of plain text and tables, in order


def choose_format(fmt: str | None, as_json: bool = False) -> str:
    """--format (and its alias --json): by default a table on a terminal and markdown in a pipe, as `xq bench`."""
    if as_json:
        if fmt is not None and fmt.lower() != "json":
            raise InputError(f"--json and --format {fmt} disagree", hint="give one of them")
        return "json"
    if fmt is None:
        return "table" if sys.stdout.isatty() else "md"
    if fmt.lower() not in FORMATS:
        raise InputError(f"unknown --format {fmt!r}", hint=f"choose from {', '.join(FORMATS)}")
    return fmt.lower()


def emit(fmt: str, parts: Sequence[Part]) -> None:
    """Print a report on stdout: `table` as rich tables never cut, `md` as paragraphs and GitHub tables, `csv` as
    its tables alone, an empty line between two (text lines have no place in CSV), with the raw numbers of the
    tables `table` built."""
    if fmt == "table":
        from rich.console import Console

        console = Console(highlight=False)
        for part in parts:
            if isinstance(part, TableData):
                show(console, rich_table(part.columns, part.rows, title=part.title, numeric=part.numeric))
            else:
                console.print(part, markup=False, soft_wrap=True)
        return
    chunks = []
    for part in parts:
        if isinstance(part, str):
            if fmt == "md":
                chunks.append(part + "\n")
        elif fmt == "md":
            chunks.append((f"**{part.title}**\n\n" if part.title else "")
                          + markdown_table(part.columns, part.rows, numeric=part.numeric))
        else:
            chunks.append(csv_table(part.csv_columns or part.columns,
                                    part.rows if part.csv_rows is None else part.csv_rows))
    sys.stdout.write("\n".join(chunks))
    sys.stdout.flush()

"""`xq bench` results as a table, markdown, JSON, JSON lines, CSV or a PNG; the cells and the formats
are bench's, the table/markdown/CSV/JSON writing is `xqcli.readouts.render`'s."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from xqcli.errors import InputError, MissingDependencyError
from xqcli.readouts import render as renderer
from xqcli.readouts.bench.results import SCHEMA_VERSION, BenchResult, Row

FORMATS = ("table", "md", "json", "jsonl", "csv")
TOOL = "bench"
# "compression" is fp16 KV bytes/token over the row's, as `xq plan` names it ("vs fp16 KV" is plan's size fraction);
# the plan column is `xq plan`'s count at the run's dtype (`columns` names it): `xq plan` itself counts fp16
COLUMNS = ("cache", "context", "B/token", "plan B/token", "compression", "cache MiB", "fp window MiB",
           "workspace MiB", "prefill tok/s", "decode ms/token (p50 / p90)", "peak MiB", "max context", "GB/s",
           "TFLOP/s", "floor ms")
NUMERIC = [c != "cache" for c in COLUMNS]
_CACHE_PARTS = ("payload", "scales", "fp_window", "workspace", "total")
CSV_FIELDS = [f.name for f in fields(Row) if f.name not in ("cache_bytes", "decode_ms_reps")] + [
    *(f"cache_{k}" for k in _CACHE_PARTS), "decode_ms_reps"]


def number(v: Any) -> str:
    """A metric value in messages and CSV lists: floats to 6 significant digits."""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def format_duration(s: float) -> str:
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _in_mib(b: float | None) -> str:
    """A cell of a "MiB" column."""
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def cells(r: Row) -> list[str]:
    """One table/markdown line of `COLUMNS`."""
    c = r.cache_bytes or {}
    kind = r.kind + (" (transformers)" if r.engine == "transformers" else "")
    if r.error:
        return [kind, f"{r.context:,}", f"error: {r.error}"] + ["-"] * (len(COLUMNS) - 3)
    q = (c.get("payload", 0) + c.get("scales", 0)) if c else None
    return [kind, f"{r.context:,}", _f(r.bytes_per_token, ",.1f"), _f(r.plan_bytes_per_token, ",.1f"),
            _f(r.ratio, ".2f") + ("x" if r.ratio else ""), _in_mib(q), _in_mib(c.get("fp_window")),
            _in_mib(c.get("workspace")), _f(r.prefill_tok_s, ",.1f"),
            f"{_f(r.decode_ms, '.3f')} / {_f(r.decode_ms_p90, '.3f')}", _in_mib(r.peak_bytes),
            _f(r.max_context, ","), _f(r.achieved_gb_s, ".2f"), _f(r.achieved_tflop_s, ".4f"),
            _f(r.roofline_ms, ".3f")]


def columns(res: BenchResult) -> list[str]:
    """`COLUMNS` with the plan column naming its dtype: a float32 run's kv row is twice `xq plan`'s fp16 count."""
    return [f"{c} ({res.settings['dtype']})" if c == "plan B/token" else c for c in COLUMNS]


def header_lines(res: BenchResult) -> list[str]:
    """The run's record above (markdown) or below (table) the rows: device, versions, model, settings."""
    env, m, s, p = res.environment, res.model, res.settings, res.peaks
    if env.get("gpu"):
        g = env["gpu"]
        hw = (f"{g['name']} (sm {g['capability']}, {g['total_bytes'] / 2**30:.0f} GiB, "
              f"driver {g['driver'] or '?'})")
    else:
        cpu = env["cpu"]
        hw = f"CPU {cpu['model']} ({cpu['cores']} cores, {cpu['torch_threads']} torch threads)"
    load = f", load average {env['load_avg'][0]}" if env.get("load_avg") else ""
    commit = "n/a"
    if env.get("git_commit"):
        commit = env["git_commit"][:12] + ("-dirty" if env.get("git_dirty") else "")
    mem = res.memory
    budget = ("unknown" if mem["cache_budget_bytes"] is None else
              f"{mem['cache_budget_bytes'] / 2**30:,.2f} GiB ({mem['cache_budget_source']})")
    peak = {"cuda_max_memory_allocated": "torch.cuda.max_memory_allocated (weights included)",
            "cpu_peak_rss_delta": "process peak RSS growth during the row (weights excluded)"}.get(
        mem["peak_source"], "not measured")
    return [
        f"device: {hw}{load}",
        f"versions: xq {env['xq']} (commit {commit}), torch {env['torch']}, triton {env['triton'] or 'n/a'}, "
        f"transformers {env['transformers'] or 'n/a'}, CUDA {env['cuda'] or 'n/a'}",
        f"model: {m['model_type']}, {m['layers']} layers, d {m['hidden_size']}, "
        f"{m['heads']}/{m['kv_heads']} heads, {m['params'] / 1e6:,.1f}M params, "
        f"weights {m['weights_bytes'] / 2**30:.3f} GiB {m['dtype']}",
        f"run: batch {s['batch']}, {s['decode_tokens']} decode tokens x {s['reps']} reps "
        f"(+{s['warmup']} warmup), elapsed {format_duration(res.elapsed_s)}",
        f"measured peaks: copy {p.bandwidth_gb_s:,.1f} GB/s, matmul {p.tflop_s:,.3f} TFLOP/s "
        f"({p.dtype}, n={p.matmul_n})",
        f"max context: cache budget {budget}; peak memory: {peak}",
    ]


def rich_view(res: BenchResult):
    """The rows as a rich table (record as its caption), then the verdicts and notes."""
    from rich.console import Group
    from rich.text import Text

    table = renderer.rich_table(columns(res), [cells(r) for r in res.rows], title=f"xq bench: {res.target}",
                              caption="\n".join(header_lines(res)), numeric=NUMERIC)
    extra = [Text(v.text) for v in res.verdicts] + [Text("note: " + n, style="dim") for n in res.notes]
    return Group(table, *extra)


def render_md(res: BenchResult) -> str:
    head = [f"## xq bench: {res.target}", ""] + [f"- {h}" for h in header_lines(res)] + [""]
    table = renderer.markdown_table(columns(res), [cells(r) for r in res.rows], numeric=NUMERIC)
    tail = [""] + [f"- {v.text}" for v in res.verdicts] + [f"- note: {n}" for n in res.notes]
    return "\n".join(head) + "\n" + table + "\n".join(tail) + "\n"


def jsonl_records(res: BenchResult) -> list[dict[str, Any]]:
    """One flat object per row, each with target, device and dtype (for log files)."""
    dev = res.environment["gpu"]["name"] if res.environment.get("gpu") else res.settings["device"]
    return [{"target": res.target, "device_name": dev, "dtype": res.settings["dtype"]} | r.as_dict()
            for r in res.rows]


def _csv_cells(rec: dict[str, Any]) -> list[Any]:
    cache = rec.get("cache_bytes") or {}
    flat = rec | {f"cache_{k}": cache.get(k) for k in _CACHE_PARTS}
    flat["decode_ms_reps"] = ";".join(number(x) for x in rec["decode_ms_reps"])
    return [flat[k] for k in ["target", "device_name", "dtype", *CSV_FIELDS]]


def render(res: BenchResult, fmt: str) -> str:
    """The result as text in one of `FORMATS` (`table` is the rich table as plain text)."""
    if fmt == "md":
        return render_md(res)
    if fmt == "json":
        return renderer.dumps(TOOL, res.as_dict(), SCHEMA_VERSION) + "\n"
    if fmt == "jsonl":
        return renderer.jsonl(TOOL, jsonl_records(res), SCHEMA_VERSION)
    if fmt == "csv":
        return renderer.csv_table(["target", "device_name", "dtype", *CSV_FIELDS],
                                [_csv_cells(rec) for rec in jsonl_records(res)])
    if fmt == "table":
        return renderer.plain_text(rich_view(res))
    raise InputError(f"unknown --format {fmt!r} (choose from {', '.join(FORMATS)})")


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib, which is not installed",
                                     hint="pip install 'xqcli[plot]'") from None


def plot(res: BenchResult, path: str | Path) -> Path:
    """Decode ms/token and cache GB against context, one line per kind, side by side, as a PNG."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r.kind for r in res.rows))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k in kinds:
        rs = sorted((r for r in res.rows if r.kind == k and r.error is None), key=lambda r: r.context)
        ax_t.plot([r.context for r in rs], [r.decode_ms for r in rs], marker="o", label=k)
        gb = [(r.cache_bytes or {}).get("total", 0) / 1e9 for r in rs]
        ax_m.plot([r.context for r in rs], gb, marker="o", label=k)
    for ax, ylabel in ((ax_t, "decode ms/token"), (ax_m, "cache GB at context")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize="small")
    dev = res.environment["gpu"]["name"] if res.environment.get("gpu") else "CPU"
    fig.suptitle(f"xq bench: {res.target} on {dev}, batch {res.settings['batch']}, {res.settings['dtype']}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

"""Render `xq eval --task passkey --json` and `xq eval --tasks ... --json` files as BENCHMARKS.md tables.

usage: python bench/retrieval_table.py out/passkey-GQA.json out/lmeval-GQA.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def passkey_table(d: dict) -> str:
    """A table per protocol: a row per cache kind, bytes/token, then accuracy per length @ depth."""
    out = []
    for protocol in dict.fromkeys(c["protocol"] for c in d["cells"]):
        cells = [c for c in d["cells"] if c["protocol"] == protocol]
        points = list(dict.fromkeys((c["length"], c["depth"]) for c in cells))
        head = [f"{n // 1024}k @{100 * dep:.0f}%" if n % 1024 == 0 else f"{n} @{100 * dep:.0f}%" for n, dep in points]
        lines = [f"`{d['model']}` | passkey in `{d['text']}` | {protocol} protocol | {d['samples']} sample(s) per cell",
                 "", "| cache | bytes/token | " + " | ".join(head) + " | mean |",
                 "|---|---:|" + "---:|" * (len(points) + 1)]
        for cache in dict.fromkeys(c["cache"] for c in cells):
            mine = {(c["length"], c["depth"]): c for c in cells if c["cache"] == cache}
            accs = [f"{100 * mine[p]['accuracy']:.0f}%" + ("*" if mine[p]["fact_quantized"] is False else "")
                    for p in points]
            mean = sum(c["retrieved"] for c in mine.values()) / sum(c["samples"] for c in mine.values())
            bpt = next(iter(mine.values()))["bytes_per_token"]
            lines.append(f"| {cache} | {bpt:,.0f} | " + " | ".join(accs) + f" | {100 * mean:.0f}% |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def tasks_table(d: dict) -> str:
    """A row per (task, metric), a column per cache kind: value ± stderr."""
    caches = list(dict.fromkeys(s["cache"] for s in d["scores"]))
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for s in d["scores"]:
        err = f" ± {s['stderr']:.3f}" if s["stderr"] is not None else ""
        rows.setdefault((s["task"], s["metric"]), {})[s["cache"]] = f"{s['value']:.3f}{err}"
    n = {s["task"]: s["samples"] for s in d["scores"]}
    lines = [f"`{d['model']}` | lm-eval tasks {', '.join(d['tasks'])}", "",
             "| task | metric | n | " + " | ".join(caches) + " |", "|---|---|---:|" + "---:|" * len(caches)]
    for (task, metric), vals in rows.items():
        lines.append(f"| {task} | {metric} | {n[task]} | " + " | ".join(vals.get(c, "") for c in caches) + " |")
    return "\n".join(lines)


def table(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return passkey_table(d) if "cells" in d else tasks_table(d)


if __name__ == "__main__":
    print("\n\n".join(table(p) for p in sys.argv[1:]))

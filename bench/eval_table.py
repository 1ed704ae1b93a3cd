"""Render `xq eval --json` files as the markdown tables of BENCHMARKS.md.

usage: python bench/eval_table.py out/eval-GQA-paper.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    d = json.load(open(path, encoding="utf-8"))
    head = (f"`{d['model']}` | text `{d['text']}` | {d['protocol']} protocol | seq-len {d['seq_len']} | "
            f"{d['rows'][0]['scored_tokens']:,} scored tokens")
    lines = [head, "", "| method | bytes/token | vs fp16 KV | compression | ppl | Δppl | KL vs kv | top-1 vs kv |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        lines.append(f"| {r['method']} | {r['bytes_per_token']:,.0f} | {r['normalized']:.3f} | {r['compression']:.2f}x | "
                     f"{r['ppl']:.3f} | {r['delta_ppl']:+.3f} | {r['kl']:.4f} | {100 * r['top1']:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(p) for p in sys.argv[1:]))

"""Load test of `xq serve` over HTTP: sessions admitted and aggregate tokens/s per cache kind and concurrency.

For each cache kind a server is started (`python -m xqcli serve MODEL --cache KIND --budget ...`, port 0) with
the same budget and rows; for each concurrency C, C clients each send `--rounds` streaming completions back to
back (distinct prompts of about `--prompt-words` words, so no prefix is reused). Measured from the client side:
wall time, completion tokens (the usage each stream ends with), aggregate tokens/s, median time to first token;
from `/metrics`, sampled every 50 ms: the most rows running at once ("sessions admitted"), and the tokens the
budget holds for the kind.

    python bench/serve_load.py MODEL --kinds kv,kivi-4,xquant-4 --concurrency 1,4,16 --budget 96MiB \\
        --context 512 --max-rows 16 --json serve-load.json

Only the standard library is used on the client side (http.client, threads).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TEXT = ("The river ran past the old mill, where the miller kept his accounts in a ledger bound with green cloth. "
        "Every spring the water rose and the wheel turned faster, and the village children counted the turns. ")


def start_server(model: str, kind: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    """A server for `kind`; (process, host:port, its startup line)."""
    cmd = [sys.executable, "-m", "xqcli", "serve", model, "--cache", kind, "--port", "0", "--budget", args.budget,
           "--context", str(args.context), "--max-rows", str(args.max_rows), "--max-queue", "100000",
           *args.serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    for line in proc.stderr:
        m = re.search(r"on http://([\d.]+:\d+)/v1", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1), line.strip()
    raise SystemExit(f"the server for {kind} did not start (exit {proc.wait()})")


def get(addr: str, path: str) -> str:
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    conn.request("GET", path)
    body = conn.getresponse().read().decode()
    conn.close()
    return body


def metrics(addr: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in get(addr, "/metrics").splitlines()
            if line and not line.startswith("#") and "{" not in line}


def one_request(addr: str, prompt: str, max_tokens: int) -> tuple[float, int, int]:
    """One streaming completion; (seconds to the first text, completion tokens, prompt tokens)."""
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=3600)
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {resp.read().decode()}")
    first, usage = None, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        obj = json.loads(line[6:])
        if "error" in obj:
            raise SystemExit(f"the server failed a request: {obj['error']['message']}")
        if obj.get("usage"):
            usage = obj["usage"]
        elif first is None and obj["choices"] and obj["choices"][0]["text"]:
            first = time.perf_counter() - t0
    conn.close()
    return first or 0.0, usage["completion_tokens"], usage["prompt_tokens"]


def run_level(addr: str, concurrency: int, args: argparse.Namespace, tag: str) -> dict:
    """C clients, `rounds` requests each; the peak of active rows is sampled from /metrics meanwhile."""
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], metrics(addr)["xq_active_rows"])
            time.sleep(0.05)

    def client(c: int) -> list[tuple[float, int, int]]:
        words = TEXT.split()
        reps = (args.prompt_words + len(words) - 1) // len(words)
        base = " ".join((words * reps)[:args.prompt_words])
        return [one_request(addr, f"{tag} client {c} round {r}: {base}", args.max_tokens) for r in range(args.rounds)]

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(client, range(concurrency)) for r in rs]
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    tokens = sum(r[1] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "wall_s": round(wall, 3),
            "completion_tokens": tokens, "prompt_tokens": round(statistics.mean(r[2] for r in results), 1),
            "tokens_per_s": round(tokens / wall, 3), "ttft_p50_s": round(statistics.median(r[0] for r in results), 3),
            "sessions_admitted": int(peak[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--kinds", default="kv,kivi-4,xquant-4")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--budget", default="96MiB", help="the one cache budget every kind gets")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=240)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="requests each client sends, one after another")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("serve_args", nargs="*", help="after --: more `xq serve` options (e.g. --window 32)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for kind in args.kinds.split(","):
        proc, addr, line = start_server(args.model, kind, args)
        try:
            print(line, file=sys.stderr, flush=True)
            m = metrics(addr)
            for c in levels:
                r = run_level(addr, c, args, f"{kind}-{c}")
                rows.append({"kind": kind, "budget_tokens": int(m["xq_cache_budget_tokens"])} | r)
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    print("| kind | budget tokens | concurrency | sessions admitted | requests | tokens/s | TTFT p50 s |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['budget_tokens']:,} | {r['concurrency']} | {r['sessions_admitted']} | "
              f"{r['requests']} | {r['tokens_per_s']:.2f} | {r['ttft_p50_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "argv": sys.argv, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

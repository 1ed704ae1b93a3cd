"""Decode-attention kernel benchmark at Llama-3.1-8B shapes, one layer (GPU only).

Providers, per cached length N (default 4k, 32k, 128k), batch B:
  xquant   fused XQuant attention (xqcli.kernels.xquant_attention): packed X·U_k / X·U_v latent codes
           (per-channel / per-token, g=128) + 128-token bf16 tail; K rebuilt with M_k, RoPE, V absorbed
  kivi     fused KIVI* attention (xqcli.kernels.kivi_attention): pre-RoPE K codes per-channel,
           V per-token, RoPE on the fly
  sdpa     torch scaled_dot_product_attention over a bf16 KV cache of the same length (GQA)
and the compute floor of each: FLOPs / the bf16 matmul peak measured here with a large torch.matmul.

Every provider is first checked against its reference (on min(N, --check-len) tokens); the check
column is RMS(out - ref) / RMS(ref). Timing is triton.testing.do_bench (median, L2 flushed).

    python bench/bench_kernels.py                       # table to stdout
    python bench/bench_kernels.py --bits 2 --json bench/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

# Llama-3.1-8B attention shapes
D_MODEL, N_HEADS, N_KV, HEAD_DIM = 4096, 32, 8, 128
D_KV = N_KV * HEAD_DIM  # 1024: width of each SVD latent
GROUP = 128  # quantization group (tokens for per-channel, channels for per-token)
WINDOW = 128  # full-precision residual window


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,32768,131072", help="cached tokens per row, comma separated")
    p.add_argument("--batch", type=int, default=1, help="rows decoding together (default 1)")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="code width for xquant and kivi")
    p.add_argument("--providers", default="xquant,kivi,sdpa", help="subset of xquant,kivi,sdpa")
    p.add_argument("--check-len", type=int, default=32768, help="longest length checked against the references")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    p.add_argument("--json", type=Path, default=None, help="also write results, GPU, versions and commit here")
    return p.parse_args(argv)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False,
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def rope_tables(n: int, device):
    import torch

    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
    emb = torch.outer(torch.arange(n, device=device).float(), inv)
    emb = torch.cat([emb, emb], dim=-1)
    return emb.cos(), emb.sin()


def stream(x, sealed: int, axis: str, bits: int):
    """A PackedStream of x (B, N, C): the first `sealed` tokens quantized (Triton kernel), the rest bf16."""
    import torch

    from xqcli.kernels.packed import PackedStream
    from xqcli.kernels.quant import QuantSpec, quantize

    spec = QuantSpec(bits, GROUP, axis)
    bsz, n, _ = x.shape
    q = quantize(x[:, :max(sealed, 1)], spec)
    if axis == "channel" and sealed == 0:
        q = quantize(x[:, :GROUP], spec)  # shapes only; no token is read from codes when sealed == 0
    tail = x[:, sealed:].contiguous() if sealed < n else x[:, :1].contiguous()
    return PackedStream(tail=tail, sealed=torch.full((bsz,), sealed, dtype=torch.int32, device=x.device),
                        codes=q.packed, scale=q.scale, zero=q.zero, spec=spec)


def build(provider: str, n: int, bsz: int, bits: int, device):
    """(run, reference, flops, bytes) for one provider at length n; run/reference return (B, H, D)."""
    import torch
    import torch.nn.functional as F

    from xqcli.kernels.kivi_attention import kivi_attention, kivi_attention_ref
    from xqcli.kernels.xquant_attention import xquant_attention, xquant_attention_ref

    g = torch.Generator(device=device).manual_seed(n)
    bf16 = torch.bfloat16
    q = torch.randn(bsz, N_HEADS, HEAD_DIM, device=device, generator=g).to(bf16)
    seq = torch.full((bsz,), n, dtype=torch.int32, device=device)
    cos, sin = rope_tables(n, device)
    out = torch.empty_like(q)
    code_bytes = lambda c, tok: tok * c * bits / 8
    if provider == "xquant":
        lat_k = torch.randn(bsz, n, D_KV, device=device, generator=g).to(bf16)
        lat_k[..., 0] *= 30  # the outlier channel 0 of X·U_k
        lat_v = torch.randn(bsz, n, D_KV, device=device, generator=g).to(bf16)
        k = stream(lat_k, max(0, n - WINDOW) // GROUP * GROUP, "channel", bits)
        v = stream(lat_v, max(0, n - WINDOW), "token", bits)
        m_k = (torch.randn(D_KV, D_KV, device=device, generator=g) / 32).to(bf16)
        m_v = (torch.randn(D_KV, D_KV, device=device, generator=g) / 32).to(bf16)
        # K rebuild (per token: d_kv x d_kv MACs), QK^T and latent PV for 32 heads, one M_v projection per head
        flops = bsz * (2 * n * D_KV * D_KV + 2 * n * N_HEADS * HEAD_DIM + 2 * n * N_HEADS * D_KV
                       + 2 * N_HEADS * D_KV * HEAD_DIM)
        nbytes = bsz * 2 * (code_bytes(D_KV, n) + 4 * n * D_KV / GROUP) + 2 * 2 * D_KV * D_KV

        def run():
            return xquant_attention(q, k, v, m_k, m_v, cos, sin, seq, max_seq_len=n, out=out, backend="triton")

        def ref():
            return xquant_attention_ref(q, k, v, m_k, m_v, cos, sin, seq)
    elif provider == "kivi":
        kk = torch.randn(bsz, n, D_KV, device=device, generator=g).to(bf16)
        vv = torch.randn(bsz, n, D_KV, device=device, generator=g).to(bf16)
        k = stream(kk, max(0, n - WINDOW) // GROUP * GROUP, "channel", bits)
        v = stream(vv, max(0, n - WINDOW), "token", bits)
        flops = bsz * 4 * n * N_HEADS * HEAD_DIM
        nbytes = bsz * 2 * (code_bytes(D_KV, n) + 4 * n * D_KV / GROUP)

        def run():
            return kivi_attention(q, k, v, cos, sin, seq, max_seq_len=n, out=out, backend="triton")

        def ref():
            return kivi_attention_ref(q, k, v, cos, sin, seq)
    elif provider == "sdpa":
        kk = torch.randn(bsz, N_KV, n, HEAD_DIM, device=device, generator=g).to(bf16)
        vv = torch.randn(bsz, N_KV, n, HEAD_DIM, device=device, generator=g).to(bf16)
        q4 = q[:, :, None]  # (B, H, 1, D)
        flops = bsz * 4 * n * N_HEADS * HEAD_DIM
        nbytes = bsz * 2 * n * D_KV * 2

        def run():
            return F.scaled_dot_product_attention(q4, kk, vv, enable_gqa=True)[:, :, 0]

        def ref():
            rep = N_HEADS // N_KV
            return F.scaled_dot_product_attention(q4.float(), kk.float().repeat_interleave(rep, 1),
                                                  vv.float().repeat_interleave(rep, 1))[:, :, 0]
    else:
        raise SystemExit(f"unknown provider {provider!r} (use xquant, kivi, sdpa)")
    return run, ref, flops, nbytes


def rms_ratio(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def matmul_peak_tflops(rep: int) -> float:
    """Measured bf16 dense matmul throughput (8192^3), the compute roof used for the floors."""
    import torch
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, rep=rep, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_kernels.py: unset TRITON_INTERPRET (the interpreter is for the CPU tests, not for timing)")
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False). "
                 "On CPU, the kernels are checked by tests/test_kernels_*.py under TRITON_INTERPRET=1.")
    import triton
    from triton.testing import do_bench

    lengths = [int(s) for s in args.lengths.split(",") if s]
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    device = torch.device("cuda")
    peak = matmul_peak_tflops(args.rep)
    rows, checks = [], {}
    for n in lengths:
        for prov in providers:
            n_chk = min(n, args.check_len)
            if (prov, n_chk) not in checks:
                run, ref, *_ = build(prov, n_chk, args.batch, args.bits, device)
                check = rms_ratio(run(), ref())
                if not math.isfinite(check) or check > 2e-2:
                    sys.exit(f"{prov} at N={n_chk}: output differs from its reference (RMS ratio {check:.3g}); "
                             "not timing")
                checks[(prov, n_chk)] = check
                del run, ref
                torch.cuda.empty_cache()
            check = checks[(prov, n_chk)]
            run, _, flops, nbytes = build(prov, n, args.batch, args.bits, device)
            ms = do_bench(run, rep=args.rep, return_mode="median")
            floor_ms = flops / (peak * 1e12) * 1e3
            rows.append({
                "tokens": n, "provider": prov + (f"-{args.bits}bit" if prov != "sdpa" else "-bf16"),
                "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "gbps": nbytes / (ms * 1e-3) / 1e9,
                "floor_ms": floor_ms, "of_floor": floor_ms / ms, "flops": flops, "bytes": nbytes,
                "check_rms_ratio": check, "checked_tokens": n_chk,
            })
            del run
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(device)
    print(f"\n{name}, batch {args.batch}, one layer of Llama-3.1-8B (32 q / 8 kv heads, head_dim 128, d_kv 1024); "
          f"bf16 matmul peak measured {peak:.0f} TFLOP/s\n")
    print("| tokens | provider | ms | TFLOP/s | GB/s | compute floor ms | floor / ms | check (RMS ratio) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        at = f" @{r['checked_tokens']}" if r["checked_tokens"] != r["tokens"] else ""
        chk = f"{r['check_rms_ratio']:.1e}{at}"
        print(f"| {r['tokens']} | {r['provider']} | {r['ms']:.4f} | {r['tflops']:.1f} | {r['gbps']:.0f} | "
              f"{r['floor_ms']:.4f} | {r['of_floor']:.0%} | {chk} |")
    if args.json:
        meta = {
            "gpu": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "git_commit": git_commit(), "peak_bf16_tflops": peak,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode-attention kernel benchmark, one layer (GPU; `--interpret` checks the plumbing on CPU).

Providers, per cached length N (default 4k, 32k, 128k), batch B, at a model's attention shape
(`--shape`, default Llama-3.1-8B: 32 q / 8 kv heads, head_dim 128):
  xquant   fused XQuant attention (xqcli.kernels.xquant_attention). GQA shapes: packed X·U_k / X·U_v
           latent codes (per-channel / per-token); MHA shapes (llama-2-7b): packed X per-token, K and V
           rebuilt with W_kᵀ / W_vᵀ. Plus a full-precision tail (the window); K rebuilt per tile,
           RoPE, V absorbed.
  kivi     fused KIVI* attention (xqcli.kernels.kivi_attention): pre-RoPE K codes per-channel,
           V per-token, RoPE on the fly
  xquant-paged, kivi-paged (opt-in: --providers)
           the same kernels reading the same codes from shuffled 128-token pages through a block table
           (xqcli.kernels.packed.PagedStream, how the vLLM plugin holds them): the cost of paging
  sdpa     torch scaled_dot_product_attention over a bf16 KV cache of the same length
and the compute floor of each: FLOPs / the bf16 matmul peak measured here with a large torch.matmul.
For xquant the K rebuild's own throughput is measured too: the device time of the kernel that
rebuilds K (``_xq_scores_kernel``, which also scores and softmaxes) from torch.profiler, against the
rebuild's FLOPs: a lower bound of the rebuild's TFLOP/s, the number the 60%-of-peak target is about.

Every provider is first checked against its reference (on min(N, --check-len) tokens); the check
column is RMS(out - ref) / RMS(ref). Timing is triton.testing.do_bench (median, L2 flushed).

    python bench/bench_kernels.py                       # table to stdout
    python bench/bench_kernels.py --bits 2 --json bench/results.json
    python bench/bench_kernels.py --shape llama-2-7b --lengths 4096,32768
    TRITON_INTERPRET=1 python bench/bench_kernels.py --interpret   # CPU: checks and table, no real timing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from xqcli.cache.spec import uses_latents
from xqcli.config import ModelConfig
from xqcli.readouts.plan import shape_config
from xqcli.system import git_commit


@dataclass(frozen=True)
class Shape:
    """One attention layer's shape and the cache layout around it."""

    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    latent: bool  # GQA XQuant caches the SVD latents X·U_k, X·U_v when they are narrower than X
    group: int = 128  # quantization group (tokens for per-channel, channels for per-token)
    window: int = 128  # full-precision residual window

    @classmethod
    def of(cls, cfg: ModelConfig, **layout: int) -> "Shape":
        """A model's attention layer, with xqcli's latent rule."""
        return cls(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                   cfg.rope_theta, uses_latents(cfg), **layout)

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim


def tiny_config(name: str, d_model: int, heads: int, kv_heads: int) -> ModelConfig:
    """An attention layer small enough for the Triton interpreter, odd enough to cross tile edges."""
    raw = dict(model_type="llama", hidden_size=d_model, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64, vocab_size=64,
               rope_theta=500000.0)
    return ModelConfig.from_dict(raw, source=f"shape {name}")


SHAPES = {
    "llama-3.1-8b": Shape.of(shape_config("llama-3.1-8b")),
    "llama-2-7b": Shape.of(shape_config("llama-2-7b")),
    # for --interpret only
    "tiny": Shape.of(tiny_config("tiny", 576, 6, 2), group=32, window=16),
    "tiny-mha": Shape.of(tiny_config("tiny-mha", 192, 3, 3), group=32, window=16),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="attention shape (default llama-3.1-8b; tiny under --interpret)")
    p.add_argument("--lengths", default=None,
                   help="cached tokens per row, comma separated (default 4096,32768,131072; 40,300 under --interpret)")
    p.add_argument("--batch", type=int, default=1, help="rows decoding together (default 1)")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="code width for xquant and kivi")
    p.add_argument("--providers", default="xquant,kivi,sdpa",
                   help="subset of xquant,kivi,sdpa,xquant-paged,kivi-paged")
    p.add_argument("--check-len", type=int, default=32768, help="longest length checked against the references")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    p.add_argument("--json", type=Path, default=None, help="also write results, GPU, versions and commit here")
    p.add_argument("--interpret", action="store_true",
                   help="run on CPU under TRITON_INTERPRET=1 in float32: checks every provider against its "
                        "reference and renders the table (timings are the interpreter's, meaningless)")
    args = p.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.interpret else "llama-3.1-8b")
    args.lengths = args.lengths or ("40,300" if args.interpret else "4096,32768,131072")
    return args


def commit_label() -> str | None:
    """HEAD of this checkout, with "-dirty" when tracked files changed."""
    rev, dirty = git_commit(Path(__file__))
    return None if rev is None else rev + ("-dirty" if dirty else "")


def rope_tables(n: int, shape: Shape, device):
    import torch

    hd = shape.head_dim
    inv = 1.0 / (shape.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
    emb = torch.outer(torch.arange(n, device=device).float(), inv)
    emb = torch.cat([emb, emb], dim=-1)
    return emb.cos(), emb.sin()


def stream(x, sealed: int, axis: str, bits: int, group: int):
    """A PackedStream of x (B, N, C): the first `sealed` tokens quantized, the rest full precision."""
    import torch
    from xqcli.kernels.packed import PackedStream
    from xqcli.kernels.quant import QuantSpec, quantize

    spec = QuantSpec(bits, group, axis)
    bsz, n, _ = x.shape
    q = quantize(x[:, :max(sealed, 1)], spec)
    if axis == "channel" and sealed == 0:
        q = quantize(x[:, :group], spec)  # shapes only; no token is read from codes when sealed == 0
    tail = x[:, sealed:].contiguous() if sealed < n else x[:, :1].contiguous()
    return PackedStream(tail=tail, sealed=torch.full((bsz,), sealed, dtype=torch.int32, device=x.device),
                        codes=q.packed, scale=q.scale, zero=q.zero, spec=spec)


def paged(ps, page: int, device):
    """The sealed tokens of PackedStream `ps` moved into shuffled shared pages of `page` token rows, found
    through a block table (``PagedStream``, the vLLM plugin's layout); the tail stays as it is."""
    import torch
    from xqcli.kernels.packed import PagedStream, PageFormat
    from xqcli.kernels.quant import QTensor

    fmt = PageFormat(ps.c, ps.spec, page)
    bsz, s, _ = ps.codes.shape
    per_row = math.ceil(s / page)
    table = torch.randperm(bsz * per_row, generator=torch.Generator().manual_seed(per_row)).view(bsz, per_row)
    pages = torch.zeros(bsz * per_row, page, fmt.row_bytes, dtype=torch.uint8, device=device)
    for b in range(bsz):
        for p in range(per_row):
            rows = slice(p * page, min(s, (p + 1) * page))
            m = rows.stop - rows.start
            if ps.spec.axis == "token":
                q = QTensor(ps.codes[b, rows], ps.scale[b, rows], ps.zero[b, rows], ps.spec, torch.Size((m, ps.c)),
                            torch.float32)
                pages[table[b, p], :m] = fmt.encode_tokens(q)
            elif m == page:  # a partial per-channel page is never sealed
                q = QTensor(ps.codes[b, rows], ps.scale[b, p:p + 1], ps.zero[b, p:p + 1], ps.spec,
                            torch.Size((m, ps.c)), torch.float32)
                pages[table[b, p]] = fmt.encode_page(q)
    return PagedStream(pages=pages, block_table=table.to(device=device, dtype=torch.int32), offset=0, fmt=fmt,
                       tail=ps.tail, sealed=ps.sealed)


@dataclass
class Case:
    """One provider at one length: the op, its reference, and what it counts."""

    run: object  # () -> (B, H, D)
    ref: object  # () -> (B, H, D), float32 math
    flops: float
    nbytes: float
    rebuild_flops: float = 0.0  # the K rebuild's share of flops (xquant)


def build(provider: str, shape: Shape, n: int, bsz: int, bits: int, device, dtype) -> Case:
    """The provider's inputs at length n: random values, quantized like a cache would hold them."""
    import torch
    import torch.nn.functional as F
    from xqcli.kernels.kivi_attention import kivi_attention, kivi_attention_ref
    from xqcli.kernels.xquant_attention import xquant_attention, xquant_attention_ref

    g = torch.Generator(device=device).manual_seed(n)
    heads, n_kv, hd, d_kv, grp = shape.heads, shape.kv_heads, shape.head_dim, shape.d_kv, shape.group
    rand = lambda *size: torch.randn(*size, device=device, generator=g)
    q = rand(bsz, heads, hd).to(dtype)
    seq = torch.full((bsz,), n, dtype=torch.int32, device=device)
    cos, sin = rope_tables(n, shape, device)
    out = torch.empty_like(q)
    per_channel_sealed = max(0, n - shape.window) // grp * grp
    per_token_sealed = max(0, n - shape.window)
    code_bytes = lambda c, tok: tok * c * bits / 8
    scale_bytes = lambda c, tok: 4 * tok * c / grp
    base, _, layout = provider.partition("-")
    if layout not in ("", "paged") or base not in ("xquant", "kivi", "sdpa") or (base == "sdpa" and layout):
        raise SystemExit(f"unknown provider {provider!r} (use xquant, kivi, sdpa, xquant-paged, kivi-paged)")
    make = stream if not layout else (lambda *a: paged(stream(*a), grp, device))  # paged: the same streams in pages
    if base == "xquant":
        if shape.latent:  # GQA: latents X·U_k (per-channel), X·U_v (per-token), M_k, M_v (d_kv x d_kv)
            c_k = c_v = d_kv
            lat_k = rand(bsz, n, c_k).to(dtype)
            lat_k[..., 0] *= 30  # the outlier channel 0 of X·U_k
            k = make(lat_k, per_channel_sealed, "channel", bits, grp)
            v = make(rand(bsz, n, c_v).to(dtype), per_token_sealed, "token", bits, grp)
            m_k, m_v = (rand(c_k, d_kv) / math.sqrt(c_k)).to(dtype), (rand(c_v, d_kv) / math.sqrt(c_v)).to(dtype)
            cache_bytes = 2 * (code_bytes(c_k, n) + scale_bytes(c_k, n))
        else:  # MHA: X per-token, read once for K and V; M = W_kᵀ, W_vᵀ (strided views, as in xqcli)
            c_k = c_v = shape.d_model
            k = v = make(rand(bsz, n, c_k).to(dtype), per_token_sealed, "token", bits, grp)
            m_k = (rand(d_kv, c_k) / math.sqrt(c_k)).to(dtype).T
            m_v = (rand(d_kv, c_v) / math.sqrt(c_v)).to(dtype).T
            cache_bytes = code_bytes(c_k, n) + scale_bytes(c_k, n)
        rebuild = 2 * n * c_k * d_kv  # K = lat_k · M_k for every cached token
        # + QKᵀ, the probability-weighted latent (V absorbed), one M_v projection per head
        flops = bsz * (rebuild + 2 * n * heads * hd + 2 * n * heads * c_v + 2 * heads * c_v * hd)
        nbytes = bsz * cache_bytes + m_k.element_size() * (m_k.numel() + m_v.numel())

        def run():
            return xquant_attention(q, k, v, m_k, m_v, cos, sin, seq, max_seq_len=n, out=out, backend="triton")

        def ref():
            return xquant_attention_ref(q, k, v, m_k, m_v, cos, sin, seq)
        return Case(run, ref, flops, nbytes, bsz * rebuild)
    if base == "kivi":
        k = make(rand(bsz, n, d_kv).to(dtype), per_channel_sealed, "channel", bits, grp)
        v = make(rand(bsz, n, d_kv).to(dtype), per_token_sealed, "token", bits, grp)

        def run():
            return kivi_attention(q, k, v, cos, sin, seq, max_seq_len=n, out=out, backend="triton")

        def ref():
            return kivi_attention_ref(q, k, v, cos, sin, seq)
        return Case(run, ref, bsz * 4 * n * heads * hd, bsz * 2 * (code_bytes(d_kv, n) + scale_bytes(d_kv, n)))
    if base == "sdpa":
        kk, vv = rand(bsz, n_kv, n, hd).to(dtype), rand(bsz, n_kv, n, hd).to(dtype)
        q4 = q[:, :, None]  # (B, H, 1, D)

        def run():
            return F.scaled_dot_product_attention(q4, kk, vv, enable_gqa=n_kv != heads)[:, :, 0]

        def ref():
            rep = heads // n_kv
            return F.scaled_dot_product_attention(q4.float(), kk.float().repeat_interleave(rep, 1),
                                                  vv.float().repeat_interleave(rep, 1))[:, :, 0]
        return Case(run, ref, bsz * 4 * n * heads * hd, bsz * 2 * n * d_kv * kk.element_size())
    raise AssertionError(provider)  # checked above


def rms_ratio(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def matmul_peak_tflops(rep: int, device) -> float:
    """Measured dense matmul throughput, the compute roof of the floors (bf16 8192^3 on a GPU)."""
    import torch

    if device.type != "cuda":  # --interpret: a CPU float32 roof, for the table's shape only
        a = torch.randn(1024, 1024)
        return 2 * 1024**3 / (cpu_ms(lambda: a @ a) * 1e-3) / 1e12
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, rep=rep, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def cpu_ms(fn, runs: int = 3) -> float:
    """Median wall time of a few runs after one warm-up (the --interpret stand-in for do_bench)."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def kernel_ms(run, name: str, iters: int = 20) -> float | None:
    """Mean device time per call of the kernels whose name contains `name` (torch.profiler, CUDA)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
                   for e in prof.key_averages() if name in e.key)
    return total_us / iters / 1e3 if total_us else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpreted != args.interpret:
        sys.exit("bench_kernels.py: --interpret and TRITON_INTERPRET=1 go together (the interpreter checks the "
                 "plumbing on CPU; timing needs a GPU with TRITON_INTERPRET unset)")
    import torch

    if args.interpret:
        device, dtype = torch.device("cpu"), torch.float32  # the interpreter mishandles bf16 math
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        sys.exit("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "on CPU, TRITON_INTERPRET=1 python bench/bench_kernels.py --interpret checks the plumbing")
    import triton

    shape = SHAPES[args.shape]
    lengths = [int(s) for s in args.lengths.split(",") if s]
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    peak = matmul_peak_tflops(args.rep, device)
    if device.type == "cuda":
        from triton.testing import do_bench

        def timer(fn) -> float:
            return do_bench(fn, rep=args.rep, return_mode="median")
    else:
        timer = cpu_ms
    rows, checks = [], {}
    for n in lengths:
        for prov in providers:
            n_chk = min(n, args.check_len)
            if (prov, n_chk) not in checks:
                case = build(prov, shape, n_chk, args.batch, args.bits, device, dtype)
                check = rms_ratio(case.run(), case.ref())
                if not math.isfinite(check) or check > 2e-2:
                    sys.exit(f"{prov} at N={n_chk}: output differs from its reference (RMS ratio {check:.3g}); "
                             "not timing")
                checks[(prov, n_chk)] = check
                del case
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            check = checks[(prov, n_chk)]
            case = build(prov, shape, n, args.batch, args.bits, device, dtype)
            ms = timer(case.run)
            rebuild_ms = None
            if case.rebuild_flops and device.type == "cuda":  # xquant and xquant-paged
                rebuild_ms = kernel_ms(case.run, "_xq_scores_kernel")
            floor_ms = case.flops / (peak * 1e12) * 1e3
            rows.append({
                "tokens": n, "provider": prov + (f"-{args.bits}bit" if prov != "sdpa" else "-bf16" if dtype == torch.bfloat16 else "-fp32"),
                "ms": ms, "tflops": case.flops / (ms * 1e-3) / 1e12, "gbps": case.nbytes / (ms * 1e-3) / 1e9,
                "floor_ms": floor_ms, "of_floor": floor_ms / ms, "flops": case.flops, "bytes": case.nbytes,
                "rebuild_ms": rebuild_ms,
                "rebuild_tflops": case.rebuild_flops / (rebuild_ms * 1e-3) / 1e12 if rebuild_ms else None,
                "check_rms_ratio": check, "checked_tokens": n_chk,
            })
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter (float32)"
    dt = "bf16" if device.type == "cuda" else "CPU float32"
    print(f"\n{name}, batch {args.batch}, one layer of {args.shape} ({shape.heads} q / {shape.kv_heads} kv heads, "
          f"head_dim {shape.head_dim}, d_model {shape.d_model}, {'latents' if shape.latent else 'X'} cached by xquant); "
          f"{dt} matmul peak measured {peak:.1f} TFLOP/s\n")
    if device.type != "cuda":
        print("(interpreted: the checks are real, the timings are not)\n")
    print("| tokens | provider | ms | TFLOP/s | GB/s | compute floor ms | floor / ms | K rebuild TFLOP/s "
          "| rebuild / peak | check (RMS ratio) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        at = f" @{r['checked_tokens']}" if r["checked_tokens"] != r["tokens"] else ""
        chk = f"{r['check_rms_ratio']:.1e}{at}"
        rb = (f"{r['rebuild_tflops']:.1f} | {r['rebuild_tflops'] / peak:.0%}" if r["rebuild_tflops"]
              else "— | —")
        print(f"| {r['tokens']} | {r['provider']} | {r['ms']:.4f} | {r['tflops']:.1f} | {r['gbps']:.0f} | "
              f"{r['floor_ms']:.4f} | {r['of_floor']:.0%} | {rb} | {chk} |")
    if args.json:
        meta = {
            "device": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "git_commit": commit_label(), "peak_tflops": peak,
            "dtype": str(dtype), "shape": {"name": args.shape} | vars(shape) | {"d_kv": shape.d_kv},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

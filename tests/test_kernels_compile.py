"""Ahead-of-time compile of every kernel for a GPU target, without a GPU.

The interpreter never runs the GPU-only branches (bf16 tensor-core dots, tf32, ``enable_fp_fusion``)
and does not check tile shapes against ``tl.dot``'s limits or register/shared-memory use. This test
runs each launcher on CPU tensors in a subprocess with the interpreter off, intercepts the launch,
and compiles it with ``triton.compile`` for sm_90 (TTIR -> PTX -> cubin with Triton's own ptxas).
It checks that compilation succeeds and that shared memory fits an H100/H200 (227 KB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from xqcli.kernels import _triton

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _triton.HAS_TRITON, reason="needs triton"),
]

DRIVER = textwrap.dedent(r'''
    import json, sys, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    TARGET = GPUTarget("cuda", 90, 32)
    PTR = {torch.float64: "*fp64", torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
           torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64"}
    results = []

    def compile_launch(fn, args, kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
        sig, consts = {}, {}
        for i, name in enumerate(fn.arg_names):
            val = kwargs[name] if name in kwargs else args[i]
            if fn.params[i].is_constexpr:
                sig[name], consts[name] = "constexpr", val
            elif isinstance(val, torch.Tensor):
                sig[name] = PTR[val.dtype]
            elif isinstance(val, bool):
                sig[name] = "i1"
            elif isinstance(val, int):
                sig[name] = "i64" if abs(val) >= 2**31 else "i32"
            else:
                sig[name] = "fp32"
        try:
            k = triton.compile(ASTSource(fn, sig, consts), target=TARGET, options=opts)
            results.append({"kernel": fn.__name__, "ok": True, "shared": k.metadata.shared})
        except Exception as e:  # report every failure, not only the first
            results.append({"kernel": fn.__name__, "ok": False, "error": repr(e)[-1500:]})

    JITFunction.__getitem__ = lambda self, grid: (lambda *a, **kw: compile_launch(self, a, dict(kw)))

    import xqcli.kernels.decode_ops as ops
    import xqcli.kernels.kivi_attention as ka
    import xqcli.kernels.kv_attention as kva
    import xqcli.kernels.quant as quant
    import xqcli.kernels.rope_q as rq
    import xqcli.kernels.stream_append as sa
    import xqcli.kernels.xquant_attention as xa
    import xqcli.kernels.xquant_cl as cl
    from xqcli.kernels.packed import PackedStream
    from xqcli.kernels.quant import QuantSpec, quantize_ref
    for m in (quant, xa, ka, cl, kva, sa, rq, ops):
        m.use_triton = lambda *a, **k: True  # launch "on CUDA" with CPU tensors

    def stream(x, sealed, axis, bits):
        q = quantize_ref(x, QuantSpec(bits, 128, axis))
        return PackedStream(tail=x[:, :128].contiguous(), sealed=torch.full((x.shape[0],), sealed),
                            codes=q.packed, scale=q.scale, zero=q.zero, spec=q.spec)

    bf16, f32 = torch.bfloat16, torch.float32
    seq = torch.tensor([1, 250])
    for bits in (2, 3):
        for axis in ("token", "channel"):
            quant.quantize_pack_triton(torch.randn(2, 130, 577), QuantSpec(bits, 128, axis))
    for dt in (bf16, f32):
        x = torch.randn(2, 256, 1024).to(dt)
        emb = torch.randn(256, 128)
        k, v = stream(x, 128, "channel", 2), stream(x, 200, "token", 3)
        w = torch.randn(1024, 1024).to(dt)
        xa.xquant_attention(torch.randn(2, 32, 128).to(dt), k, v, w, w, emb, emb, seq, b_k=w[0], b_v=w[0],
                            max_seq_len=250, backend="triton")
        ka.kivi_attention(torch.randn(2, 32, 128).to(dt), k, v, emb, emb, seq, capacity=256, backend="triton")
        kv_buf = torch.randn(2, 8, 256, 128).to(dt)  # a layer of the `kv` cache: 32 query heads over 8
        kv_new = torch.randn(2, 8, 128).to(dt)
        kva.kv_append_rope(kv_buf, kv_buf, kv_new, kv_new, emb, emb, seq, backend="triton")
        kva.kv_attention(torch.randn(2, 32, 128).to(dt), kv_buf, kv_buf, seq, window=100, capacity=256,
                         backend="triton")
        xm = stream(torch.randn(2, 256, 192).to(dt), 200, "token", 4)  # MHA: X per token, W^T views
        wm = torch.randn(192, 192).to(dt)
        xa.xquant_attention(torch.randn(2, 3, 64).to(dt), xm, xm, wm.T, wm.T, emb[:, :64], emb[:, :64], seq,
                            max_seq_len=250, backend="triton")
        d = stream(torch.randn(2, 256, 256).to(dt), 200, "token", 2)
        cl.xquant_cl_update(torch.randn(2, 256, 512).to(dt), d, seq, u_kv=torch.randn(512, 256).to(dt),
                            max_seq_len=250, backend="triton")
        sealing = torch.randn(2, 512, dtype=torch.float64)  # GQA-CL decode: the sealed token's float64 chain
        cl.xquant_cl_update(torch.randn(2, 256, 512).to(dt), d, seq, u_kv=torch.randn(512, 256).to(dt),
                            sealing=sealing, sealing_pos=seq - 1, capacity=256, backend="triton")
        cl.xquant_cl_project(torch.randn(2, 256, 512).to(dt), torch.randint(0, 250, (16, 2)).T, sealing,
                             torch.randn(512, 256).to(dt), backend="triton")
        ones = torch.ones(2, dtype=torch.long)
        for axis, bits in (("token", 4), ("channel", 2)):  # the decode step's quantize-and-append, T = 1
            spec = QuantSpec(bits, 32, axis)
            bufs = sa.allocate_stream(2, 256, 200, spec, 16, dt, "cpu")
            sa.stream_append(torch.randn(2, 1, 200).to(dt), seq, ones, bufs, window=16, spec=spec,
                             backend="triton")
        spec = QuantSpec(3, 32, "token")  # XQuant-CL: the closed-loop delta against X̂ of the layer before
        bufs = sa.allocate_stream(2, 256, 200, spec, 16, dt, "cpu")
        sa.stream_append(torch.randn(2, 1, 200).to(dt), seq, ones, bufs, window=16, spec=spec,
                         sub=torch.randn(2, 1, 200).to(dt), sub_start=seq, backend="triton")
        rq.rope_q(torch.randn(2, 32, 128).to(dt), emb, emb, seq, backend="triton")
        h, gain = torch.randn(2, 1000).to(dt), torch.randn(1000).to(dt)
        ops.add_rms_norm(h, h, gain, 1e-6, backend="triton")
        ops.rms_norm(h, gain, 1e-6, backend="triton")
        ops.silu_mul(torch.randn(2, 2 * 1000).to(dt), backend="triton")
    print(json.dumps(results))
''')


def test_all_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence Triton 3.9's default-change warning
    proc = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['kernel']}: {r['error']}" for r in failed)
    names = {r["kernel"] for r in results}
    assert names == {"_quant_token_kernel", "_quant_channel_kernel", "_xq_scores_kernel", "_xq_pv_kernel",
                     "_xq_reduce_kernel", "_kivi_split_kernel", "merge_splits_kernel", "_cl_update_kernel",
                     "_cl_project_kernel",
                     "_kv_append_kernel", "_kv_split_kernel", "_append_kernel", "_rope_q_kernel",
                     "_add_rms_norm_kernel", "_silu_mul_kernel"}
    too_big = [r for r in results if r["shared"] > 227 * 1024]
    assert not too_big, f"shared memory above 227 KB: {too_big}"

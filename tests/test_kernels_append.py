"""Device-side stream append (kernels/stream_append.py) and the ring tail layout of the attention kernels.

Run under TRITON_INTERPRET=1 on CPU (tests/conftest.py) or compiled on a GPU. Buffers start poisoned
(random codes, NaN scales, zeros and ring slots), so a byte written where it should not be, or not
written where it should, shows up in the bit-for-bit comparisons. Shapes stay small: the interpreter
costs ~30 ms per program.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xqcli.kernels.stream_append as sa
from xqcli.kernels import _triton
from xqcli.kernels.kivi_attention import kivi_attention
from xqcli.kernels.packed import PackedStream
from xqcli.kernels.quant import QuantSpec, dequantize_ref, quantize_ref
from xqcli.kernels.stream_append import (
    StreamBuffers,
    allocate_stream,
    ring_capacity,
    ring_view,
    sealed_count,
    stream_append,
    stream_append_ref,
    stream_values_ref,
)
from xqcli.kernels.xquant_attention import xquant_attention
from xqcli.kernels.xquant_cl import xquant_cl_update

pytestmark = pytest.mark.skipif(
    not _triton.HAS_TRITON or not (_triton.INTERPRET or torch.cuda.is_available()),
    reason="needs triton and CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AS_INT = {torch.uint8: torch.uint8, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


# ----------------------------------------------------------------------------- helpers


def poisoned(bsz: int, max_len: int, c: int, spec: QuantSpec, window: int, dtype: torch.dtype,
             seed: int = 0) -> StreamBuffers:
    """Stream buffers holding garbage: random code bytes, NaN scales, zeros and ring slots."""
    buf = allocate_stream(bsz, max_len, c, spec, window, dtype, DEVICE)
    gen = torch.Generator().manual_seed(seed)
    buf.codes.copy_(torch.randint(0, 256, buf.codes.shape, generator=gen, dtype=torch.uint8))
    for t in (buf.scale, buf.zero, buf.tail):
        t.fill_(float("nan"))
    return buf


def clone(buf: StreamBuffers) -> StreamBuffers:
    return StreamBuffers(*(t.clone() for t in buf))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, on the CPU; every NaN (poison) as one pattern, since torch's CPU ops
    do not keep NaN payloads."""
    if t.is_floating_point():
        t = torch.where(t.isnan(), torch.tensor(float("nan"), dtype=t.dtype, device=t.device), t)
    return t.contiguous().view(AS_INT[t.dtype]).cpu()


def assert_same(name: str, a: StreamBuffers, b: StreamBuffers) -> None:
    for field, x, y in zip(StreamBuffers._fields, a, b):
        diff = (bits(x) != bits(y)).nonzero()
        assert diff.numel() == 0, f"{name}: {field} differs at {diff[:5].tolist()}"


def stored_values(x: torch.Tensor, sub: torch.Tensor | None, sub_start: torch.Tensor | None) -> torch.Tensor:
    """What the stream quantizes for tokens 0.. of x (B, N, C): x − sub[t − sub_start], in x's dtype."""
    if sub is None:
        return x
    idx = torch.arange(x.shape[1], device=x.device)[None, :] - sub_start.long()[:, None]
    return x - sub.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))


# ----------------------------------------------------------------------------- cases


CASES = [  # (id, C, g, bits, axis, window, dtype, with sub, block_c)
    ("tok-c40-g8-b3-w5", 40, 8, 3, "token", 5, torch.float32, False, None),
    ("tok-c72-g16-b2-w0-chunks", 72, 16, 2, "token", 0, torch.float32, False, 16),
    ("tok-c72-g32-b4-w37-sub-bf16", 72, 32, 4, "token", 37, torch.bfloat16, True, None),
    ("tok-c40-g8-b8-w5-sub-fp16-chunks", 40, 8, 8, "token", 5, torch.float16, True, 24),
    ("ch-c40-g8-b3-w5", 40, 8, 3, "channel", 5, torch.float32, False, None),
    ("ch-c72-g16-b4-w0-bf16-chunks", 72, 16, 4, "channel", 0, torch.bfloat16, False, 16),
    ("ch-c72-g32-b2-w16-fp16", 72, 32, 2, "channel", 16, torch.float16, False, None),
    ("ch-c40-g16-b8-w5", 40, 16, 8, "channel", 5, torch.float32, False, None),
]
IDS = [c[0] for c in CASES]


class Case:
    """One parametrized stream: spec, window, dtype, optional sub (a fixed (B, max_len, C) table)."""

    def __init__(self, row: tuple, bsz: int = 3, max_len: int = 160) -> None:
        _, self.c, g, nbits, axis, self.window, self.dtype, with_sub, self.block_c = row
        self.spec = QuantSpec(nbits, g, axis)
        self.bsz, self.max_len = bsz, max_len
        self.cap = ring_capacity(max_len, self.window, self.spec)
        gen = torch.Generator().manual_seed(11)
        self.sub = self.sub_start = None
        if with_sub:  # shifted by a row offset, so sub_start matters
            self.sub = (torch.randn(bsz, max_len + 4, self.c, generator=gen) * 0.5).to(self.dtype).to(DEVICE)
            self.sub_start = torch.tensor([-4, 0, -2], dtype=torch.int32, device=DEVICE)

    def tokens(self, n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(self.bsz, n, self.c, generator=gen) * 3 + 1).to(self.dtype).to(DEVICE)

    def append(self, new, lens, n_new, buf, kernel: bool, host: tuple[list[int], list[int]] | None = None) -> None:
        """One step; ``host``: the lengths and counts mirrored on the host, for the reference."""
        kw = {"window": self.window, "spec": self.spec, "sub": self.sub, "sub_start": self.sub_start}
        if kernel:
            stream_append(new, lens, n_new, buf, block_c=self.block_c, backend="triton", **kw)
        elif host is not None:
            stream_append_ref(new, lens, n_new, buf, host_lengths=host[0], host_n_new=host[1], **kw)
        else:
            stream_append_ref(new, lens, n_new, buf, **kw)


def i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# ----------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("row", CASES, ids=IDS)
def test_kernel_matches_reference(row):
    """Prefill chunks longer than the ring (rows of different lengths, one row idle), then one-token
    steps: codes, scales, zeros and the whole ring equal the reference's bit for bit after every step,
    and the reference sized by host lengths equals the one sized for the worst case."""
    case = Case(row, max_len=200)
    chunk = 2 * case.cap + 3  # T > cap: ring slots are overwritten several times within the chunk
    ref = poisoned(3, case.max_len, case.c, case.spec, case.window, case.dtype)
    tri, hinted = clone(ref), clone(ref)
    lens, host = i32([0, 0, 0]), [0, 0, 0]
    steps = [(chunk, [chunk, chunk - 7, 0]), (chunk, [3, chunk, 1])] + [(1, [1, 1, b % 2]) for b in range(8)]
    for i, (t, n) in enumerate(steps):
        new, n_new = case.tokens(t, seed=i), i32(n)
        case.append(new, lens, n_new, ref, kernel=False)
        case.append(new, lens, n_new, hinted, kernel=False, host=(host, n))
        case.append(new, lens, n_new, tri, kernel=True)
        assert_same(f"{row[0]} step {i}", tri, ref)
        assert_same(f"{row[0]} step {i}, host-sized reference", hinted, ref)
        lens += n_new
        host = [h + m for h, m in zip(host, n)]


@pytest.mark.parametrize("row", [CASES[0], CASES[2], CASES[4], CASES[6]], ids=[IDS[0], IDS[2], IDS[4], IDS[6]])
def test_chunk_equals_steps_and_quantizer(row):
    """The same tokens appended in one chunk or one by one give the same stream, and that stream is
    the quantizer's: sealed codes/scales/zeros equal quantize_ref of the sealed tokens (minus sub),
    their values dequantize_ref's, and the ring holds the rest raw."""
    case = Case(row, max_len=60)
    lengths = [1, 37, 52]  # a one-token row, a row with a partial channel block, a longer one
    n = max(lengths)
    x = case.tokens(n, seed=5)
    chunk = poisoned(3, case.max_len, case.c, case.spec, case.window, case.dtype)
    steps = clone(chunk)
    case.append(x, i32([0, 0, 0]), i32(lengths), chunk, kernel=True)
    lens = i32([0, 0, 0])
    for t in range(n):
        n_new = i32([int(t < m) for m in lengths])
        case.append(x[:, t:t + 1], lens, n_new, steps, kernel=t % 3 == 0)  # kernel and reference interleaved
        lens += n_new
    seq = i32(lengths)
    v_chunk = stream_values_ref(chunk, seq, window=case.window, spec=case.spec, n=n)
    v_steps = stream_values_ref(steps, seq, window=case.window, spec=case.spec, n=n)
    assert torch.equal(v_chunk, v_steps)
    for name, a, b in zip(("codes", "scale", "zero"), chunk, steps):
        assert torch.equal(bits(a), bits(b)), name

    vals = stored_values(x, case.sub, case.sub_start)
    sealed = sealed_count(seq, case.window, case.spec).tolist()
    assert any(sealed) and any(s < m for s, m in zip(sealed, lengths))
    g = case.spec.group_size
    for b, (m, s) in enumerate(zip(lengths, sealed)):
        if s:
            q = quantize_ref(vals[b, :s], case.spec)
            rows = s if case.spec.axis == "token" else s // g
            assert torch.equal(chunk.codes[b, :s], q.packed)
            assert torch.equal(bits(chunk.scale[b, :rows]), bits(q.scale))
            assert torch.equal(bits(chunk.zero[b, :rows]), bits(q.zero))
            assert torch.equal(v_chunk[b, :s], dequantize_ref(q, torch.float32))
        assert torch.equal(v_chunk[b, s:m], x[b, s:m].float())  # the ring keeps raw values, sub or not
        assert not v_chunk[b, m:].any()


def test_small_context_ring_and_window_zero():
    """A window larger than the context allocates max_len slots, never the window; window 0 seals
    every token at once (token axis) and still needs one slot."""
    tok, ch = QuantSpec(4, 8, "token"), QuantSpec(4, 8, "channel")
    assert ring_capacity(20, 128, tok) == 20
    assert ring_capacity(500, 128, ch) == 135
    assert ring_capacity(500, 0, tok) == 1
    assert ring_capacity(500, 0, QuantSpec(4, 1, "channel")) == 1
    assert allocate_stream(2, 20, 40, ch, 128, torch.float32, DEVICE).tail.shape == (2, 20, 40)
    buf = poisoned(2, 20, 40, tok, 128, torch.float32)
    x = torch.randn(2, 20, 40, device=DEVICE)
    stream_append(x, i32([0, 0]), i32([20, 13]), buf, window=128, spec=tok, backend="triton")
    assert torch.equal(buf.tail[0], x[0]) and torch.equal(buf.tail[1, :13], x[1, :13])
    assert torch.equal(sealed_count(i32([20, 13]), 128, tok).cpu(), torch.tensor([0, 0], dtype=torch.int32))


# ----------------------------------------------------------------------------- graph-capturable loop


class ScalarReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)`` of a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class LaunchRecorder:
    """Stands in for ``_append_kernel``: records each launch's grid and arguments (tensors by address,
    shape and strides), then launches the real kernel."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            def plain(v):
                return (v.data_ptr(), tuple(v.shape), v.stride(), v.dtype) if isinstance(v, torch.Tensor) else v
            self.launches.append((grid, tuple(plain(a) for a in args), tuple(sorted(kwargs.items()))))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_300_steps_static_launch_no_host_reads(monkeypatch):
    """300 one-token steps over rows of different lengths (one pausing now and then), crossing 37
    channel-group seals and a token seal per step: every launch is identical (grid, scalars,
    addresses), nothing is read back to the host (kernel or reference path, the latter sized by
    host-side lengths or not), and the kernel's stream equals the reference's at the end."""
    spec, window, c, steps = QuantSpec(3, 8, "channel"), 5, 40, 300
    tok = QuantSpec(2, 8, "token")
    bsz, max_len = 3, steps + 20
    tri = poisoned(bsz, max_len, c, spec, window, torch.float32)
    ref = clone(tri)
    tok_ref = poisoned(bsz, max_len, c, tok, window, torch.float32, seed=1)
    sub, sub_start = torch.randn(bsz, max_len, c, device=DEVICE), i32([0, 0, 0])
    lens = i32([0, 0, 0])
    prefill = torch.randn(bsz, 17, c, device=DEVICE)
    for b in (tri, ref):  # rows start at 17, 4 and 9 tokens
        stream_append(prefill, lens, i32([17, 4, 9]), b, window=window, spec=spec, backend="triton")
    stream_append_ref(prefill, lens, i32([17, 4, 9]), tok_ref, window=window, spec=tok, sub=sub, sub_start=sub_start)
    lens += i32([17, 4, 9])
    gen = torch.Generator().manual_seed(2)
    table = torch.ones(steps, bsz, dtype=torch.int32)
    table[:, 1] = (torch.rand(steps, generator=gen) > 0.1).int()  # row 1 idles about one step in ten
    table_host, host = table.tolist(), [17, 4, 9]
    table, tokens = table.to(DEVICE), torch.randn(steps, bsz, 1, c, generator=gen).to(DEVICE)
    new, n_new = torch.empty(bsz, 1, c, device=DEVICE), torch.empty(bsz, dtype=torch.int32, device=DEVICE)

    recorder = LaunchRecorder(sa._append_kernel)
    monkeypatch.setattr(sa, "_append_kernel", recorder)
    ours = str(Path(sa.__file__).parent)
    host_reads: list[str] = []

    def spy(name: str, orig):
        def wrapped(*a, **k):
            if sys._getframe(1).f_code.co_filename.startswith(ours):
                host_reads.append(name)
            return orig(*a, **k)
        return wrapped

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    with ScalarReads() as reads:
        for i in range(steps):
            new.copy_(tokens[i])  # a graph replays on static buffers
            n_new.copy_(table[i])
            stream_append(new, lens, n_new, tri, window=window, spec=spec, backend="triton")
            stream_append_ref(new, lens, n_new, ref, window=window, spec=spec, host_lengths=host,
                              host_n_new=table_host[i])
            host = [h + m for h, m in zip(host, table_host[i])]
            stream_append(new, lens, n_new, tok_ref, window=window, spec=tok, sub=sub, sub_start=sub_start,
                          backend="ref")
            lens += n_new
    monkeypatch.undo()
    assert reads.count == 0 and host_reads == []
    assert len(recorder.launches) == steps and all(r == recorder.launches[0] for r in recorder.launches)
    assert_same("300 steps", tri, ref)
    final = lens.tolist()
    assert final[0] == 17 + steps and final[1] < 4 + steps - 10
    v = stream_values_ref(tok_ref, lens, window=window, spec=tok)
    assert not v.isnan().any()  # every live token of the token stream was written


# ----------------------------------------------------------------------------- ring vs shifted tail


def shifted(stream: PackedStream, seq: torch.Tensor) -> PackedStream:
    """The same stream with the tail moved to the shifted layout (token t at tail[t − sealed]); dead
    slots of both tails are poisoned with NaN."""
    cap = stream.tail.shape[1]
    i = torch.arange(cap, device=seq.device)
    live = i[None, :] < (seq - stream.sealed)[:, None]  # (B, cap) shifted slots in use
    slot = (stream.sealed[:, None] + i[None, :]) % cap
    moved = stream.tail.gather(1, slot[..., None].expand(-1, -1, stream.c))
    nan = torch.tensor(float("nan"), dtype=stream.tail.dtype, device=seq.device)
    tail = torch.where(live[..., None], moved, nan)
    ring_live = torch.zeros_like(live).scatter_(1, slot, live)  # ring slots in use
    stream.tail.copy_(torch.where(ring_live[..., None], stream.tail, nan))
    return PackedStream(tail=tail, sealed=stream.sealed, codes=stream.codes, scale=stream.scale, zero=stream.zero,
                        spec=stream.spec)


def ring_stream(c: int, spec: QuantSpec, window: int, lens: list[int], dtype=torch.float32, seed=0) -> PackedStream:
    """A ring stream built by stream_append: a prefill chunk, then two one-token steps."""
    buf = poisoned(len(lens), max(lens) + 3, c, spec, window, dtype, seed)
    x = (torch.randn(len(lens), max(lens), c, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype).to(DEVICE)
    first = [max(0, n - 2) for n in lens]
    zero = i32([0] * len(lens))
    stream_append_ref(x, zero, i32(first), buf, window=window, spec=spec)
    for k in range(2):
        step = [int(f + k < n) for f, n in zip(first, lens)]
        at = torch.tensor([min(f + k, max(lens) - 1) for f in first], device=DEVICE)
        stream_append(x[torch.arange(len(lens)), at][:, None], i32([f + k for f in first]), i32(step), buf,
                      window=window, spec=spec, backend="triton")
    seq = i32(lens)
    stream = ring_view(buf, seq, window=window, spec=spec)
    values = stream_values_ref(buf, seq, window=window, spec=spec, n=max(lens))
    for b, n in enumerate(lens):  # two readers of the ring agree: the vectorized one and PackedStream's
        assert torch.equal(values[b, :n], stream.values_ref(b, n))
        assert torch.equal(values[b, n - 2:n], x[b, n - 2:n].float())  # the newest tokens are in the window
    return stream


@pytest.mark.parametrize("window", [8, 2], ids=["ring-view", "sealed"])
def test_values_with_the_shortest_length_known(window):
    """`min_length` (the CPU cache's host lengths) skips the mask and gives the same values, in a tensor of
    its own even when the tokens are a view of the ring (writing to it leaves the stream as it was)."""
    spec, lens = QuantSpec(4, 8, "token"), [5, 3]
    buf = poisoned(2, 8, 24, spec, window, torch.float32)
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    stream_append_ref(x, i32([0, 0]), i32(lens), buf, window=window, spec=spec)
    seq = i32(lens)
    values = stream_values_ref(buf, seq, window=window, spec=spec, n=5)
    sealed = 5 - window if window < 5 else 0
    short = stream_values_ref(buf, seq, window=window, spec=spec, n=3, max_sealed=sealed, min_length=3)
    assert torch.equal(short, values[:, :3])
    short.fill_(float("nan"))
    assert torch.equal(stream_values_ref(buf, seq, window=window, spec=spec, n=5), values)


def test_ring_layout_equals_shifted_in_every_attention_kernel():
    """xquant_attention (GQA latents and MHA X), kivi_attention and xquant_cl_update give the same
    bits over a stream whether its tail is the append kernel's ring or today's shifted layout;
    rows of 1, 23 and 50 tokens; widths 40 and 72."""
    lens = [1, 23, 50]
    seq = i32(lens)
    hd, n_kv = 32, 2
    gen = torch.Generator().manual_seed(9)
    cos_sin = torch.randn(2, 60, hd, generator=gen).to(DEVICE)
    k_lat = ring_stream(72, QuantSpec(2, 8, "channel"), 5, lens, seed=1)
    v_lat = ring_stream(40, QuantSpec(3, 16, "token"), 5, lens, seed=2)
    x = ring_stream(72, QuantSpec(4, 32, "token"), 9, lens, seed=3)
    k_kivi = ring_stream(40, QuantSpec(2, 8, "channel"), 3, lens, seed=4)
    v_kivi = ring_stream(40, QuantSpec(8, 16, "token"), 3, lens, seed=5)
    sh = {id(st): shifted(st, seq) for st in (k_lat, v_lat, x, k_kivi, v_kivi)}
    for st in (k_lat, v_lat, x, k_kivi, v_kivi):
        assert bool(st.sealed.gt(0).any()) and bool((st.sealed < seq).any())  # both codes and tail are read
        for b, n in enumerate(lens):
            assert torch.equal(st.values_ref(b, n), sh[id(st)].values_ref(b, n))

    def both(run, *streams):
        a = run(*streams)
        b = run(*(sh[id(s)] for s in streams))
        assert not a.isnan().any()
        assert torch.equal(a, b)

    q = torch.randn(3, 4, hd, generator=gen).to(DEVICE)
    m_k, m_v = (torch.randn(c, n_kv * hd, generator=gen).to(DEVICE) / math.sqrt(c) for c in (72, 40))
    cos, sin = cos_sin[0], cos_sin[1]
    both(lambda k, v: xquant_attention(q, k, v, m_k, m_v, cos, sin, seq, split_tokens=16, backend="triton"),
         k_lat, v_lat)
    w_k = torch.randn(n_kv * hd, 72, generator=gen).to(DEVICE) / math.sqrt(72)
    both(lambda xx: xquant_attention(q[:, :n_kv], xx, xx, w_k.T, w_k.T, cos, sin, seq, backend="triton"), x)
    q_kivi, rope = torch.randn(3, 2, 40, generator=gen).to(DEVICE), torch.randn(2, 60, 40, generator=gen).to(DEVICE)
    both(lambda k, v: kivi_attention(q_kivi, k, v, rope[0], rope[1], seq, split_tokens=16, backend="triton"),
         k_kivi, v_kivi)
    acc = torch.randn(3, 52, 72, generator=gen).to(DEVICE)
    both(lambda d: xquant_cl_update(acc.clone(), d, seq, backend="triton"), x)


# ----------------------------------------------------------------------------- validation


def test_validation_messages():
    spec = QuantSpec(4, 8, "token")
    buf = allocate_stream(2, 30, 40, spec, 5, torch.float32, DEVICE)
    new, lens, n = torch.zeros(2, 1, 40, device=DEVICE), i32([0, 0]), i32([1, 1])
    with pytest.raises(ValueError, match="the ring holds 5 tokens but window 6"):
        stream_append(new, lens, n, buf, window=6, spec=spec)
    with pytest.raises(ValueError, match="tail must be torch.float16"):
        stream_append(new.half(), lens, n, buf, window=5, spec=spec)
    with pytest.raises(ValueError, match="needs a token-axis stream"):
        ch = QuantSpec(4, 8, "channel")
        stream_append(new, lens, n, allocate_stream(2, 30, 40, ch, 5, torch.float32, DEVICE), window=5, spec=ch,
                      sub=new, sub_start=lens)
    with pytest.raises(ValueError, match="sub and sub_start go together"):
        stream_append(new, lens, n, buf, window=5, spec=spec, sub=new)
    with pytest.raises(ValueError, match="lengths must be int32/int64"):
        stream_append(new, lens.float(), n, buf, window=5, spec=spec)
    with pytest.raises(ValueError, match="codes must be uint8"):
        stream_append(new, lens, n, buf._replace(codes=buf.codes[..., :-1]), window=5, spec=spec)
    with pytest.raises(ValueError, match="scale must be fp16"):
        stream_append(new, lens, n, buf._replace(scale=buf.scale.float()), window=5, spec=spec)
    with pytest.raises(TypeError, match="StreamBuffers"):
        stream_append(new, lens, n, tuple(buf), window=5, spec=spec)

"""Append tokens to a cached stream on the device: seal what leaves the full-precision window and keep
the window in a ring buffer, one launch per stream, no host bookkeeping (docs/design.md §6).

A decode step captured in a CUDA graph must not depend on the current lengths on the host. So a
stream keeps no per-row counters: everything follows from the row lengths, which live in device
memory, and the launch is sized from static quantities only.

Storage of one stream of width C, batch B, capacity max_len (``StreamBuffers``, ``allocate_stream``):

- ``codes`` uint8 (B, max_len, packed_width(C, bits)) and fp16 ``scale``/``zero``, token axis
  (B, max_len, ceil(C / g)), channel axis (B, ceil(max_len / g), C): the ``quant`` layout, a channel
  group being the tokens [j·g, (j+1)·g) of the row;
- ``tail`` (B, cap, C) in the model dtype, a RING: token t of row b, while not sealed, lives in slot
  ``t % cap``. ``cap = ring_capacity(...)``: the window (token axis) or window + g − 1 (channel axis,
  a block waits until all its g tokens have left the window), at least 1, at most max_len.
- The sealed count is a pure function of the row length n (``sealed_count``): token axis
  max(0, n − window); channel axis floor(max(0, n − window) / g)·g. Tokens below it are codes, the
  others are in the ring (``packed.PackedStream`` with ``ring=True`` reads exactly this).

``stream_append(new, lengths, n_new, buffers, window=, spec=)`` appends row b's tokens
``lengths[b] .. lengths[b] + n_new[b] − 1`` (``new[b, :n_new[b]]``; ``lengths`` are the lengths BEFORE
the step and are not updated here: the caller advances them once for all its streams). Every token
that falls below the new sealed count and was not sealed before is quantized, its value taken from
the ring if it was already stored, else from ``new``; channel groups are quantized whole, their g
tokens gathered from the ring and/or ``new``. Tokens that stay unsealed are written to their ring
slots. Codes, scales and zeros are bit-identical to ``quant.quantize_ref`` of the same values.
``sub`` (B, Ls, C) with ``sub_start`` (B,), token axis only: the value quantized for token t is
``value(t) − sub[b, t − sub_start[b]]``, computed as torch computes it in the stream's dtype (float32
difference rounded to nearest even); XQuant-CL forms its closed-loop deltas this way at sealing time
(docs/design.md §4), and the ring always keeps raw values. The tokens sealed in one step all lie in
[lengths[b] − cap, lengths[b] + T), so a ``sub`` of cap + T rows starting at lengths − cap suffices.

Not checked on the device (that would sync): lengths[b] + n_new[b] <= max_len, n_new[b] <= T, and
that ``sub`` covers the tokens sealed.

``stream_append_ref`` is the specification and the CPU path: pure torch, vectorized over rows, no
host reads. Sized for the worst case of a T-token step it quantizes a g-token block per row at every
step on the channel axis; a caller that mirrors lengths on the host passes them (``host_lengths``,
``host_n_new``) and it then does only what the step needs.

The kernel (``_append_kernel``), grid (B, segments, channel chunks), all static: a segment is up to
SEG consecutive sealable tokens (token axis) or one group of g tokens (channel axis), and a step seals
at most ceil(T / SEG) segments (sealed counts grow no faster than lengths; a channel step seals at most
ceil(T / g) groups). Program (b, z, chunk) reads row b's lengths from memory, seals segment z of the
newly sealed range (or exits early), then writes ring slots. Order matters for a slot: the token that
occupied it may be sealed in this very step (every decode step of a per-token stream does that; a
prefill chunk longer than cap overwrites a slot several times over). The slot whose occupant is token
t_r is written only by the program whose segment holds t_r (program 0 also takes the slots of tokens
sealed earlier and the empty ones), after a barrier that follows its reads, and a channel chunk
reads and writes only its own channels. Each slot is written once, with the last token of the step
that lands on it. Per program, on the token axis the group scales are computed, stored, and reloaded
per element to pack (as ``quant``'s token kernel does, so groups may straddle packing units); on the
channel axis a group is a column of the (g, channels) tile and stays in registers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from xqcli.kernels._common import FLOATS, group_min_max, quant_codes, round_to, scale_zero, store_packed
from xqcli.kernels._triton import (
    INTERPRET,
    cdiv,
    check_device,
    jit,
    next_pow2,
    on_device,
    tl,
    tl_dtype,
    use_triton,
)
from xqcli.kernels.packed import PackedStream
from xqcli.kernels.quant import (
    QTensor,
    QuantSpec,
    clip_weight,
    dequantize_ref,
    packed_width,
    packing_unit,
    quantize_ref,
)

__all__ = [
    "StreamBuffers",
    "allocate_stream",
    "ring_capacity",
    "ring_view",
    "sealed_count",
    "stream_append",
    "stream_append_ref",
    "stream_values_ref",
]


class StreamBuffers(NamedTuple):
    """One stream's device storage (module docstring): codes, fp16 scale and zero, and the ring."""

    codes: Tensor  # uint8 (B, max_len, packed_width(C, bits))
    scale: Tensor  # fp16, token axis (B, max_len, ceil(C / g)); channel axis (B, ceil(max_len / g), C)
    zero: Tensor  # fp16, same shape as scale
    tail: Tensor  # (B, cap, C) model dtype: unsealed token t in slot t % cap


def ring_capacity(max_len: int, window: int, spec: QuantSpec) -> int:
    """Ring slots a stream needs: the most tokens that can wait unsealed, at least 1, at most max_len."""
    if max_len < 1 or window < 0:
        raise ValueError(f"ring_capacity: max_len must be >= 1 and window >= 0, got {max_len} and {window}")
    waiting = window if spec.axis == "token" else window + spec.group_size - 1
    return min(max(1, waiting), max_len)


def allocate_stream(batch: int, max_len: int, width: int, spec: QuantSpec, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> StreamBuffers:
    """Zeroed buffers for a stream of ``width`` channels and up to ``max_len`` tokens per row."""
    g = spec.group_size
    sz = (batch, max_len, -(-width // g)) if spec.axis == "token" else (batch, -(-max_len // g), width)
    return StreamBuffers(
        codes=torch.zeros(batch, max_len, packed_width(width, spec.bits), dtype=torch.uint8, device=device),
        scale=torch.zeros(sz, dtype=torch.float16, device=device),
        zero=torch.zeros(sz, dtype=torch.float16, device=device),
        tail=torch.zeros(batch, ring_capacity(max_len, window, spec), width, dtype=dtype, device=device),
    )


def sealed_count(lengths: Tensor, window: int, spec: QuantSpec) -> Tensor:
    """Sealed tokens of rows of these lengths, int32 on their device (no host read): tokens leave the
    window one by one on the token axis, in whole groups of g on the channel axis."""
    return _sealed(lengths, window, spec).to(torch.int32)


def _sealed(lengths: Tensor, window: int, spec: QuantSpec) -> Tensor:
    """``sealed_count`` in the lengths' dtype."""
    n = (lengths - window).clamp_(min=0)
    if spec.axis == "channel":
        n = n.div_(spec.group_size, rounding_mode="floor").mul_(spec.group_size)
    return n


def ring_view(buffers: StreamBuffers, seq_lens: Tensor, *, window: int, spec: QuantSpec,
              sealed: Tensor | None = None) -> PackedStream:
    """The attention kernels' view of a stream whose rows hold ``seq_lens`` tokens (no copy).
    ``sealed``: ``sealed_count(seq_lens, window, spec)`` when the caller already has it."""
    if sealed is None:
        sealed = sealed_count(seq_lens, window, spec)
    return PackedStream(tail=buffers.tail, sealed=sealed, codes=buffers.codes, scale=buffers.scale,
                        zero=buffers.zero, spec=spec, ring=True)


# ----------------------------------------------------------------------------- checks


def _check(op: str, new: Tensor, lengths: Tensor, n_new: Tensor, buffers: StreamBuffers, window: int,
           spec: QuantSpec, sub: Tensor | None, sub_start: Tensor | None) -> None:
    """Raise ValueError naming op unless the arguments fit one another (no device values are read)."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{op}: spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(buffers, StreamBuffers):
        raise TypeError(f"{op}: buffers must be a StreamBuffers (allocate_stream), got {type(buffers).__name__}")
    codes, scale, zero, tail = buffers
    if new.dim() != 3 or new.shape[1] < 1 or new.dtype not in FLOATS or new.stride(-1) != 1:
        raise ValueError(f"{op}: new must be a float (B, T >= 1, C) tensor with unit last stride, "
                         f"got {new.dtype} {tuple(new.shape)}")
    bsz, _, c = new.shape
    if tail.dim() != 3 or tail.shape[0] != bsz or tail.shape[2] != c or tail.dtype != new.dtype:
        raise ValueError(f"{op}: tail must be {new.dtype} (B={bsz}, cap, C={c}) like new, "
                         f"got {tail.dtype} {tuple(tail.shape)}")
    max_len = codes.shape[1] if codes.dim() == 3 else 0
    pw = packed_width(c, spec.bits)
    if codes.dtype != torch.uint8 or codes.dim() != 3 or codes.shape[0] != bsz or codes.shape[2] != pw \
            or max_len < 1:
        raise ValueError(f"{op}: codes must be uint8 (B={bsz}, max_len >= 1, packed_width({c}, {spec.bits})={pw}), "
                         f"got {codes.dtype} {tuple(codes.shape)}")
    g = spec.group_size
    want = (bsz, max_len, -(-c // g)) if spec.axis == "token" else (bsz, -(-max_len // g), c)
    for name, t in (("scale", scale), ("zero", zero)):
        if t.dtype != torch.float16 or tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} must be fp16 {want} ({spec.axis} axis), got {t.dtype} {tuple(t.shape)}")
    if type(window) is not int or window < 0:
        raise ValueError(f"{op}: window must be an integer >= 0, got {window!r}")
    need = ring_capacity(max_len, window, spec)
    if tail.shape[1] < need:
        raise ValueError(f"{op}: the ring holds {tail.shape[1]} tokens but window {window} ({spec.axis} axis, "
                         f"g={g}) needs {need} (ring_capacity)")
    for name, t in (("lengths", lengths), ("n_new", n_new)):
        if t.shape != (bsz,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: {name} must be int32/int64 of shape ({bsz},), got {t.dtype} {tuple(t.shape)}")
    if (sub is None) != (sub_start is None):
        raise ValueError(f"{op}: sub and sub_start go together")
    if sub is not None:
        if spec.axis != "token":
            raise ValueError(f"{op}: sub (closed-loop deltas) needs a token-axis stream, got the {spec.axis} axis")
        if sub.dim() != 3 or sub.shape[0] != bsz or sub.shape[2] != c or sub.dtype != new.dtype \
                or sub.shape[1] < 1 or sub.stride(-1) != 1:
            raise ValueError(f"{op}: sub must be {new.dtype} (B={bsz}, Ls >= 1, C={c}) with unit last stride, "
                             f"got {sub.dtype} {tuple(sub.shape)}")
        if sub_start.shape != (bsz,) or sub_start.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: sub_start must be int32/int64 of shape ({bsz},), "
                             f"got {sub_start.dtype} {tuple(sub_start.shape)}")
    for name, t in (("codes", codes), ("scale", scale), ("zero", zero), ("tail", tail)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
    check_device(op, new=new, lengths=lengths, n_new=n_new, codes=codes, scale=scale, zero=zero, tail=tail, sub=sub,
                 sub_start=sub_start)


# ----------------------------------------------------------------------------- reference (pure torch)


def _put(rows: Tensor, first: Tensor, hi: Tensor, *pairs: tuple[Tensor, Tensor]) -> None:
    """buf[b, first[b] + i] = src[b, i] wherever first[b] + i < hi[b], for each (buf, src) pair
    (same positions; hi[b] − first[b] <= src rows).

    Writes over a window of positions that are distinct and inside buf, so nothing is read back to
    the host; the positions outside [first, hi) get their old values back.
    """
    size, n_src = pairs[0][0].shape[1], pairs[0][1].shape[1]
    n = min(n_src, size)
    pos = first.clamp(max=size - n)[:, None] + torch.arange(n, device=rows.device)  # (B, n)
    i = pos - first[:, None]
    ok = ((i >= 0) & (pos < hi[:, None]))[..., None]
    i = i.clamp(0, n_src - 1)
    for buf, src in pairs:
        buf[rows, pos] = torch.where(ok, src[rows, i], buf[rows, pos])


def _sealed_host(n: int, window: int, spec: QuantSpec) -> int:
    s = max(0, n - window)
    return s if spec.axis == "token" else s // spec.group_size * spec.group_size


def stream_append_ref(new: Tensor, lengths: Tensor, n_new: Tensor, buffers: StreamBuffers, *, window: int,
                      spec: QuantSpec, sub: Tensor | None = None, sub_start: Tensor | None = None,
                      host_lengths: Sequence[int] | None = None, host_n_new: Sequence[int] | None = None) -> None:
    """Reference of ``stream_append`` (the CPU path): vectorized over rows, no host reads; in place.

    Without host information it does the worst case of a T-token step every time (on the channel
    axis that is quantizing a g-token block per row each step). ``host_lengths``/``host_n_new``,
    the same values as ``lengths``/``n_new`` mirrored on the host (a CPU cache has them), size the
    work to what this step seals and spills instead: same result, nothing sealed, nothing quantized.
    """
    _check("stream_append_ref", new, lengths, n_new, buffers, window, spec, sub, sub_start)
    _append_ref(new, lengths, n_new, buffers, window=window, spec=spec, sub=sub, sub_start=sub_start,
                host_lengths=host_lengths, host_n_new=host_n_new)


def _append_ref(new: Tensor, lengths: Tensor, n_new: Tensor, buffers: StreamBuffers, *, window: int,
                spec: QuantSpec, sub: Tensor | None, sub_start: Tensor | None,
                host_lengths: Sequence[int] | None, host_n_new: Sequence[int] | None) -> None:
    """`stream_append_ref` on checked arguments (`stream_append` checks them once, then dispatches here)."""
    if host_lengths is not None and host_n_new is not None:
        _append_rows(new, buffers, window=window, spec=spec, sub=sub, sub_start=sub_start,
                     host_lengths=host_lengths, host_n_new=host_n_new)
        return
    codes, scale, zero, tail = buffers
    bsz, t_new, c = new.shape
    cap, dev = tail.shape[1], new.device
    g = spec.group_size
    seg = 1 if spec.axis == "token" else g
    n_seg, k = cdiv(t_new, seg), min(t_new, cap)  # segments (tokens / groups) a step can seal; ring writes
    rows = torch.arange(bsz, device=dev)[:, None]
    lens = lengths.long()[:, None]
    end = lens + n_new.long()[:, None]
    s0, s1 = _sealed(lens, window, spec), _sealed(end, window, spec)
    if n_seg:  # candidate tokens s0 .. s0 + n_seg·seg − 1: from the ring while stored, else from new
        pos = s0 + torch.arange(n_seg * seg, device=dev)
        vals = torch.where((pos < lens)[..., None], tail[rows, pos % cap], new[rows, (pos - lens).clamp(0, t_new - 1)])
        if sub is not None:
            vals = vals - sub[rows, (pos - sub_start.long()[:, None]).clamp(0, sub.shape[1] - 1)]
        s0, s1 = s0[:, 0], s1[:, 0]
        if spec.axis == "token":
            q = quantize_ref(vals, spec)
            _put(rows, s0, s1, (codes, q.packed), (scale, q.scale), (zero, q.zero))
        else:
            q = quantize_ref(vals.view(bsz * n_seg, g, c), spec)  # one group of g tokens per candidate block
            _put(rows, s0, s1, (codes, q.packed.view(bsz, n_seg * g, -1)))
            _put(rows, s0 // g, s1 // g, (scale, q.scale.view(bsz, n_seg, c)), (zero, q.zero.view(bsz, n_seg, c)))
        s1 = s1[:, None]
    if k:  # only the step's last k <= cap tokens can stay unsealed, so their slots are distinct
        t_w = end - k + torch.arange(k, device=dev)
        slots = t_w % cap
        keep = (t_w >= torch.maximum(s1, lens))[..., None]
        tail[rows, slots] = torch.where(keep, new[rows, (t_w - lens).clamp(0, t_new - 1)], tail[rows, slots])


def _append_rows(new: Tensor, buffers: StreamBuffers, *, window: int, spec: QuantSpec, sub: Tensor | None,
                 sub_start: Tensor | None, host_lengths: Sequence[int], host_n_new: Sequence[int]) -> None:
    """`_append_ref` for a caller that has the lengths on the host (the CPU cache): row by row, with slices
    sized to exactly what each row seals and keeps, a handful of tensor ops per row instead of the
    vectorized form's several dozen (the CPU decode step runs this for every stream of every layer).
    Quantizes the same tokens with the same quantizer, so the stream is bit for bit the vectorized one's
    (tests/test_kernels_append.py checks it)."""
    codes, scale, zero, tail = buffers
    cap, g, dev = tail.shape[1], spec.group_size, new.device
    for b, (n, m) in enumerate(zip(host_lengths, host_n_new)):
        if m == 0:
            continue
        s0, s1 = _sealed_host(n, window, spec), _sealed_host(n + m, window, spec)
        if s1 > s0:  # tokens s0 .. s1 − 1 seal: the stored ones from the ring, the rest from new
            vals = new[b, max(0, s0 - n):max(0, s1 - n)]
            if s0 < n:
                vals = torch.cat([tail[b, torch.arange(s0, min(s1, n), device=dev) % cap], vals])
            if sub is not None:
                at = torch.arange(s0, s1, device=dev) - sub_start[b].long()
                vals = vals - sub[b, at.clamp(0, sub.shape[1] - 1)]
            if spec.axis == "token":
                q = quantize_ref(vals, spec)
                codes[b, s0:s1], scale[b, s0:s1], zero[b, s0:s1] = q.packed, q.scale, q.zero
            else:
                q = quantize_ref(vals.view(-1, g, vals.shape[-1]), spec)  # one group per sealed block
                codes[b, s0:s1] = q.packed.view(s1 - s0, -1)
                scale[b, s0 // g:s1 // g], zero[b, s0 // g:s1 // g] = q.scale[:, 0], q.zero[:, 0]
        first = max(s1, n)  # tokens first .. n + m − 1 wait unsealed (at most cap of them)
        if first < n + m:
            slot = first % cap
            if slot + n + m - first <= cap:
                tail[b, slot:slot + n + m - first] = new[b, first - n:m]
            else:
                tail[b, torch.arange(first, n + m, device=dev) % cap] = new[b, first - n:m]


def stream_values_ref(buffers: StreamBuffers, lengths: Tensor, *, window: int, spec: QuantSpec,
                      n: int | None = None, max_sealed: int | None = None, min_length: int | None = None) -> Tensor:
    """Rows' first ``n`` tokens (default max_len) as float32 (B, n, C): dequantized sealed tokens
    (``quant.dequantize_ref``), then the ring's; 0 at and after each row's length.

    ``max_sealed``: the most sealed tokens of any row, when the caller knows it on the host; only that
    many tokens are dequantized (the CPU decode path would otherwise unpack the whole stream each step).
    ``min_length``: the shortest row's length, likewise; when no row is shorter than ``n`` nothing is
    masked (a lone decode row is never shorter)."""
    codes, scale, zero, tail = buffers
    bsz, max_len, _ = codes.shape
    c, cap = tail.shape[2], tail.shape[1]
    n = max_len if n is None else n
    ns = n if max_sealed is None else min(n, max_sealed)
    t = torch.arange(n, device=codes.device)
    ring = (tail[:, :n] if n <= cap else tail[:, t % cap]).float()  # slot t % cap is t while t < cap
    if min_length is not None and min_length >= n:  # nothing to mask; the result never shares the ring's storage
        live = ring.clone() if ring.data_ptr() == tail.data_ptr() else ring
    else:
        live = torch.where(t[:, None] < lengths[:, None, None], ring, torch.zeros((), device=codes.device))
    if ns == 0:
        return live
    rows = ns if spec.axis == "token" else -(-ns // spec.group_size)
    q = QTensor(codes[:, :ns], scale[:, :rows], zero[:, :rows], spec, torch.Size((bsz, ns, c)), torch.float32)
    sealed = sealed_count(lengths, window, spec)[:, None, None]
    head = torch.where(t[:ns, None] < sealed, dequantize_ref(q, torch.float32), live[:, :ns])
    return head if ns == n else torch.cat([head, live[:, ns:]], dim=1)


# ----------------------------------------------------------------------------- kernel


@jit
def _source(o_t, o_c, m_x, seq0, p_new, s_nt, p_tail, s_tt, p_sub, s_ut, sub0,
            CAP: tl.constexpr, HAS_SUB: tl.constexpr, ROUND: tl.constexpr):
    """Float32 values quantized for tokens o_t, channels o_c (broadcastable) of one row: the ring for
    tokens stored before the step (o_t < seq0), else new; minus sub when given; clamped to the fp16
    range (quant rule step 1)."""
    m_r = o_t < seq0
    b_x = tl.load(p_tail + (o_t % CAP) * s_tt + o_c, mask=m_x & m_r, other=0.0)
    b_x = tl.where(m_r, b_x, tl.load(p_new + (o_t - seq0) * s_nt + o_c, mask=m_x & (o_t >= seq0), other=0.0))
    b_x = b_x.to(tl.float32)
    if HAS_SUB:
        b_d = b_x - tl.load(p_sub + (o_t - sub0) * s_ut + o_c, mask=m_x, other=0.0).to(tl.float32)
        b_x = round_to(b_d, ROUND)
    return tl.minimum(tl.maximum(b_x, -65504.0), 65504.0)


@jit
def _append_kernel(
    NEW, s_nb, s_nt,  # new tokens (B, T, C)
    LENS, NNEW,  # (B,) row lengths before the step, tokens appended
    P, s_pb, s_pt,  # codes (B, max_len, PW) uint8
    S, Z, s_sb, s_ss,  # scale, zero (B, max_len, NG) token axis / (B, ceil(max_len / G), C) channel axis
    TAIL, s_tb, s_tt,  # the ring (B, CAP, C)
    SUB, s_ub, s_ut, SUB0,  # sub (B, Ls, C) and each row's first sub token (B,), read only if HAS_SUB
    C, NG, NU, WINDOW,  # channels, groups per row (token axis), packing units per row, fp window
    clip_w,  # float32 (1 - clip) / 2
    CAP: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr, G: tl.constexpr,
    PER_CHANNEL: tl.constexpr, HAS_SUB: tl.constexpr, ROUND: tl.constexpr,
    SEG: tl.constexpr, GT: tl.constexpr, CW: tl.constexpr, NGB: tl.constexpr, GP: tl.constexpr,
    PU: tl.constexpr, UB: tl.constexpr, BU: tl.constexpr, BW: tl.constexpr, BCW: tl.constexpr,
):
    i_b, i_z, i_ch = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    seq0 = tl.load(LENS + i_b).to(tl.int64)
    seq1 = seq0 + tl.load(NNEW + i_b).to(tl.int64)
    s0 = tl.maximum(seq0 - WINDOW, 0)
    s1 = tl.maximum(seq1 - WINDOW, 0)
    if PER_CHANNEL:
        s0 = s0 // G * G
        s1 = s1 // G * G
    a = s0 + i_z * SEG  # this program's segment: tokens [a, a + SEG) of the newly sealed range
    c_lo = i_ch * CW
    p_new, p_tail = NEW + i_b * s_nb, TAIL + i_b * s_tb
    p_sub, sub0 = SUB, seq0
    if HAS_SUB:
        p_sub, sub0 = SUB + i_b * s_ub, tl.load(SUB0 + i_b).to(tl.int64)
    o_j = tl.arange(0, PU)
    o_u = c_lo // PU + tl.arange(0, BU)  # this chunk's packing units
    m_u = (o_u < NU) & (o_u < (c_lo + CW) // PU)
    o_cu = o_u[:, None] * PU + o_j[None, :]  # (BU, PU) their channels
    m_cu = (o_cu < C) & m_u[:, None]
    if a < s1:
        if PER_CHANNEL:  # one group: a (GT, BU, PU) tile, each channel's group a column
            o_i = tl.arange(0, GT)
            o_t = a + o_i.to(tl.int64)
            m_t = o_i < G
            m_x = m_t[:, None, None] & m_cu[None, :, :]
            b_x = _source(o_t[:, None, None], o_cu[None, :, :], m_x, seq0, p_new, s_nt, p_tail, s_tt, p_sub, s_ut,
                          sub0, CAP, HAS_SUB, ROUND)
            b_mn, b_mx = group_min_max(b_x, m_x, m_cu, 0)
            b_scale, b_zero = scale_zero(b_mn, b_mx, clip_w, LEVELS)  # (BU, PU)
            o_s = i_b * s_sb + (a // G) * s_ss + o_cu
            tl.store(S + o_s, b_scale, mask=m_cu)
            tl.store(Z + o_s, b_zero, mask=m_cu)
            b_q = tl.where(m_x, quant_codes(b_x, b_scale[None, :, :], b_zero[None, :, :], LEVELS), 0)
        else:  # SEG tokens: group scales first (SEG, NGB, GP), stored, then reloaded per element to pack
            o_t = a + tl.arange(0, SEG).to(tl.int64)
            m_t = o_t < s1
            o_g = c_lo // G + tl.arange(0, NGB)
            m_g = (o_g < NG) & (o_g < (c_lo + CW) // G)
            o_i = tl.arange(0, GP)
            o_cg = o_g[:, None] * G + o_i[None, :]
            m_x = m_t[:, None, None] & (m_g[:, None] & (o_i < G)[None, :] & (o_cg < C))[None, :, :]
            b_x = _source(o_t[:, None, None], o_cg[None, :, :], m_x, seq0, p_new, s_nt, p_tail, s_tt, p_sub, s_ut,
                          sub0, CAP, HAS_SUB, ROUND)
            m_s = m_t[:, None] & m_g[None, :]
            b_mn, b_mx = group_min_max(b_x, m_x, m_s, 2)
            b_scale, b_zero = scale_zero(b_mn, b_mx, clip_w, LEVELS)  # (SEG, NGB)
            o_s = i_b * s_sb + o_t[:, None] * s_ss + o_g[None, :]
            tl.store(S + o_s, b_scale, mask=m_s)
            tl.store(Z + o_s, b_zero, mask=m_s)
            tl.debug_barrier()  # the reloads below read what other threads of this program stored
            m_x = m_t[:, None, None] & m_cu[None, :, :]
            b_x = _source(o_t[:, None, None], o_cu[None, :, :], m_x, seq0, p_new, s_nt, p_tail, s_tt, p_sub, s_ut,
                          sub0, CAP, HAS_SUB, ROUND)
            o_s = i_b * s_sb + o_t[:, None, None] * s_ss + (o_cu // G)[None, :, :]
            b_scale = tl.load(S + o_s, mask=m_x, other=0.0)
            b_zero = tl.load(Z + o_s, mask=m_x, other=0.0)
            b_q = tl.where(m_x, quant_codes(b_x, b_scale, b_zero, LEVELS), 0)
        store_packed(P + i_b * s_pb + o_t[:, None] * s_pt + o_u[None, :] * UB, b_q, m_t[:, None] & m_u[None, :],
                     BITS, PU, UB)
    tl.debug_barrier()  # this program's ring reads above come before its ring writes below
    # Ring slots, named by u = (the slot's token before the step) + CAP, in [seq0, seq0 + CAP): this
    # program writes those whose old token lies in its segment (program 0: also older and empty slots),
    # with the step's last token on the slot, if that one stays unsealed.
    base = s0 + CAP
    u_lo = tl.where(i_z == 0, seq0, base + i_z * SEG)
    u_hi = tl.minimum(tl.minimum(seq0 + CAP, seq1), base + (i_z + 1) * SEG)
    o_w = tl.arange(0, BCW)
    o_cw = c_lo + o_w
    m_cw = (o_w < CW) & (o_cw < C)
    for u0 in range(u_lo, u_hi, BW):
        o_slot = u0 + tl.arange(0, BW).to(tl.int64)
        t_w = o_slot + CAP * ((seq1 - 1 - o_slot) // CAP)
        m_w = ((o_slot < u_hi) & (t_w >= s1))[:, None] & m_cw[None, :]
        b_v = tl.load(p_new + (t_w - seq0)[:, None] * s_nt + o_cw[None, :], mask=m_w, other=0.0)
        tl.store(p_tail + (t_w % CAP)[:, None] * s_tt + o_cw[None, :], b_v, mask=m_w)


def stream_append(new: Tensor, lengths: Tensor, n_new: Tensor, buffers: StreamBuffers, *, window: int,
                  spec: QuantSpec, sub: Tensor | None = None, sub_start: Tensor | None = None,
                  host_lengths: Sequence[int] | None = None, host_n_new: Sequence[int] | None = None,
                  block_c: int | None = None, backend: str = "auto", check: bool = True) -> None:
    """Append ``new[b, :n_new[b]]`` to every row b of a stream after its ``lengths[b]`` tokens, in place.

    Args:
        new: (B, T, C) tokens in the ring's dtype (unit last stride; any other strides).
        lengths: (B,) int32/int64 on the device, the row lengths BEFORE this step (not updated here).
        n_new: (B,) int32/int64 on the device, tokens appended per row, <= T.
        buffers: the stream (``allocate_stream``); the ring holds at least ``ring_capacity`` tokens.
        window: full-precision tokens (docs/design.md §6); spec: how sealed tokens are quantized.
        sub, sub_start: optional (B, Ls, C) and (B,): quantize value(t) − sub[b, t − sub_start[b]]
            (token axis; module docstring).
        host_lengths, host_n_new: ``lengths`` and ``n_new`` mirrored on the host, if the caller has
            them; only the reference reads them (``stream_append_ref``), the kernel never does.
        block_c: channels per program (rounded up to whole groups and packing units); tests use it
            to force several chunks on narrow streams.
        backend: "auto" (Triton for CUDA tensors, else the reference), "triton" or "ref".
        check: False skips the argument checks: for a caller that allocated the buffers
            (``allocate_stream``) and built ``new``, ``lengths`` and ``n_new`` itself (``xqcli.cache``'s
            streams). The checks cost ~20 µs of Python, paid for every stream of every layer on the CPU
            decode path.

    The launch depends only on B, T, C, the buffers' shapes and the spec: a CUDA graph can replay it
    every step while ``lengths`` advance in device memory.
    """
    op = "stream_append"
    if check:
        _check(op, new, lengths, n_new, buffers, window, spec, sub, sub_start)
    if not use_triton(op, backend, new):
        _append_ref(new, lengths, n_new, buffers, window=window, spec=spec, sub=sub, sub_start=sub_start,
                    host_lengths=host_lengths, host_n_new=host_n_new)
        return
    codes, scale, zero, tail = buffers
    bsz, t_new, c = new.shape
    g, bits, cap = spec.group_size, spec.bits, tail.shape[1]
    per_unit, unit_bytes = packing_unit(bits)
    n_units = -(-c // per_unit)
    per_channel = spec.axis == "channel"
    if per_channel:  # a segment is one group; a chunk is whole packing units
        seg, gt, align = g, next_pow2(g), per_unit
        rows = gt
    else:  # a segment is up to SEG tokens; a chunk is whole groups and whole packing units
        seg, gt, align = min(next_pow2(t_new), 16), 1, math.lcm(g, per_unit)
        rows = seg
    if block_c is None:
        block_c = (8192 if INTERPRET else 4096) // rows  # about that many tile elements per program
    cw = min(max(1, cdiv(block_c, align)), cdiv(c, align)) * align
    bu = next_pow2(cw // per_unit)
    has_sub = sub is not None
    s_sub = (sub.stride(0), sub.stride(1)) if has_sub else (0, 0)
    with on_device(new.device):
        _append_kernel[(bsz, cdiv(t_new, seg), cdiv(c, cw))](
            new, new.stride(0), new.stride(1),
            lengths, n_new,
            codes, codes.stride(0), codes.stride(1),
            scale, zero, scale.stride(0), scale.stride(1),
            tail, tail.stride(0), tail.stride(1),
            sub if has_sub else new, *s_sub, sub_start if has_sub else lengths,
            c, -(-c // g), n_units, window,
            clip_weight(spec.clip),
            CAP=cap, BITS=bits, LEVELS=spec.levels, G=g, PER_CHANNEL=per_channel, HAS_SUB=has_sub,
            ROUND=tl_dtype(new.dtype), SEG=seg, GT=gt, CW=cw, NGB=next_pow2(max(1, cw // g)), GP=next_pow2(g),
            PU=per_unit, UB=unit_bytes, BU=bu, BW=min(next_pow2(cap), 16), BCW=next_pow2(cw),
            enable_fp_fusion=False, num_warps=4,
        )

"""The cost model of one decode step (docs/design.md §8): FLOPs, bytes moved, and the roofline floor.

Per decode step, batch B, context N, L layers, d = hidden, d_kv = n_kv·head_dim:
- FLOPs = 2·(matmul parameters)·B + attention 4·q_dim·N·L·B (QKᵀ and PV) + rebuild FLOPs of the kind:
  `kv`, `kivi-B`: 0 (dequantization is not counted);
  `xquant-B` with latents (GQA, 2·d_kv < d): 2·2·N·d_kv² per layer (K = lat_k·M_k, V = lat_v·M_v);
  `xquant-B` caching X: 2·2·N·d·d_kv per layer (K = X̂·W_k, V = X̂·W_v; MHA: 4·N·d²);
  `xquant-cl-B`: plain XQuant below the seed layer; from the seed layer on, with latents
  8·N·d·d_kv per layer (up-project 2·d_kv -> d, then W_kv d -> 2·d_kv), caching X N·(d + 4·d·d_kv).
- Bytes = weights read per step (every parameter except an untied input embedding, which is only
  indexed) + the stored cache (payload + scales + fp window; the XQuant-CL accumulator is a transient
  workspace and its traffic is not counted).
- Roofline floor = bytes / measured peak bandwidth + rebuild FLOPs / measured peak FLOP/s (no overlap
  assumed; the paper's premise is that the rebuild hides under weight streaming, which would make the
  floor the max of the two terms).

Ratios are against fp16 KV (`kv_bytes_per_token`) whatever the model dtype, so `kv` in float32 shows 0.5.
"""

from __future__ import annotations

import torch

from xqcli.cache.spec import CacheSpec, kv_bytes_per_token, uses_latents
from xqcli.config import ModelConfig
from xqcli.readouts.bench.results import Peaks, Row


def elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters multiplied per token: every linear layer and the LM head (norms and the lookup excluded)."""
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    attn = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d
    if cfg.attention_bias:
        attn += cfg.q_dim + 2 * cfg.kv_dim
    mlp = 3 * d * cfg.intermediate_size
    return L * (attn + mlp) + cfg.vocab_size * d


def weights_read_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Weight bytes a decode step streams: the matmul parameters plus the norms."""
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    return (matmul_params(cfg) + norms) * elem_bytes(dtype)


def rebuild_flops(cfg: ModelConfig, spec: CacheSpec, n: int, batch: int = 1) -> int:
    """FLOPs to rebuild K and V of n cached tokens in every layer (module docstring)."""
    if spec.method in ("kv", "kivi"):
        return 0
    d, dkv, L = cfg.hidden_size, cfg.kv_dim, cfg.num_hidden_layers
    lat = uses_latents(cfg)
    plain = 4 * dkv * dkv if lat else 4 * d * dkv  # per token per layer
    if spec.method == "xquant":
        return batch * n * L * plain
    plain_layers = min(max(spec.base_layers - 1, 0), L)
    cl = 8 * d * dkv if lat else d + 4 * d * dkv
    return batch * n * (plain_layers * plain + (L - plain_layers) * cl)


def attention_flops(cfg: ModelConfig, n: int, batch: int = 1) -> int:
    """QKᵀ and PV of one new token against n cached ones, all layers."""
    return 4 * cfg.q_dim * n * cfg.num_hidden_layers * batch


def decode_flops(cfg: ModelConfig, spec: CacheSpec | None, n: int, batch: int = 1) -> int:
    rb = rebuild_flops(cfg, spec, n, batch) if spec is not None else 0
    return 2 * matmul_params(cfg) * batch + attention_flops(cfg, n, batch) + rb


def prefill_flops(cfg: ModelConfig, spec: CacheSpec | None, n: int, batch: int = 1) -> int:
    """n tokens through every layer (causal attention), the LM head on the last one, the cache rebuild."""
    body = 2 * (matmul_params(cfg) - cfg.vocab_size * cfg.hidden_size) * n * batch
    head = 2 * cfg.vocab_size * cfg.hidden_size * batch
    attn = 2 * cfg.q_dim * n * n * cfg.num_hidden_layers * batch
    return body + head + attn + (rebuild_flops(cfg, spec, n, batch) if spec is not None else 0)


def reference_traffic(cfg: ModelConfig, spec: CacheSpec | None, n: int, batch: int, elem: int) -> int:
    """Extra bytes the pure-torch path moves per step for a quantized kind: every stored token is
    dequantized and rebuilt into dense tensors in the model dtype (written, then read) in every layer."""
    if spec is None or spec.method == "kv":
        return 0
    d, kv = cfg.hidden_size, cfg.kv_dim
    width = {"kivi": 5 * kv, "xquant": 5 * kv if uses_latents(cfg) else d + 3 * kv,
             "xquant-cl": 3 * d + 3 * kv}
    return 2 * batch * n * cfg.num_hidden_layers * elem * width[spec.method]


def derive(row: Row, cfg: ModelConfig, spec: CacheSpec | None, dtype: torch.dtype, peaks: Peaks) -> None:
    """Fill a measured row's derived columns: ratios, bytes and FLOPs per step, achieved rates, the floor."""
    kv16 = kv_bytes_per_token(cfg)
    if row.bytes_per_token:
        row.ratio = kv16 / row.bytes_per_token
    if row.plan_bytes_per_token:
        row.plan_ratio = kv16 / row.plan_bytes_per_token
    if row.cache_bytes is None:
        return
    n = row.context
    stored = row.cache_bytes["payload"] + row.cache_bytes["scales"] + row.cache_bytes["fp_window"]
    row.step_bytes = weights_read_bytes(cfg, dtype) + stored
    row.rebuild_flops = rebuild_flops(cfg, spec, n, row.batch) if spec is not None else 0
    row.step_flops = decode_flops(cfg, spec, n, row.batch)
    mem_s = row.step_bytes / (peaks.bandwidth_gb_s * 1e9)
    comp_s = row.rebuild_flops / (peaks.tflop_s * 1e12)
    row.roofline_mem_ms, row.roofline_compute_ms = mem_s * 1e3, comp_s * 1e3
    row.roofline_ms = (mem_s + comp_s) * 1e3
    if row.decode_ms:
        step_s = row.decode_ms / 1e3
        row.achieved_gb_s = row.step_bytes / step_s / 1e9
        row.achieved_tflop_s = row.step_flops / step_s / 1e12

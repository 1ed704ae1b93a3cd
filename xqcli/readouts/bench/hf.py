"""`xq bench --hf`: transformers' generate with its default dynamic cache, on the very same weights."""

from __future__ import annotations

import statistics
import time

import torch

from xqcli.cache.base import CacheBytes
from xqcli.cache.spec import kv_bytes_per_token
from xqcli.errors import InputError, MissingDependencyError
from xqcli.model import Transformer
from xqcli.readouts.bench.cost import elem_bytes
from xqcli.readouts.bench.measure import PeakMemory, time_decode
from xqcli.readouts.bench.results import HF_KIND, Row

_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
                "max_position_embeddings", "tie_word_embeddings", "attention_bias")


def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--hf needs transformers, which is not installed",
                                     hint="pip install transformers") from None


def hf_model(model: Transformer):
    """transformers' CausalLM for our config, holding the very same weight tensors (assign=True)."""
    require_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.config
    raw = cfg.to_dict()
    kwargs = {k: raw[k] for k in _CONFIG_KEYS if k in raw}
    if kwargs.get("rope_scaling") is None:
        kwargs.pop("rope_scaling", None)
    if cfg.model_type == "qwen2":
        kwargs.pop("attention_bias", None)
    if cfg.model_type == "mistral":  # MistralConfig defaults to a 4096-token window: say ours, even if none
        kwargs["sliding_window"] = cfg.sliding_window
    hf_cfg = AutoConfig.for_model(cfg.model_type, **kwargs)
    hf_cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    try:
        with torch.device(model.device):
            hf = AutoModelForCausalLM.from_config(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    result = hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and cfg.tie_word_embeddings)
               and not k.endswith("inv_freq")]
    if missing or result.unexpected_keys:
        raise InputError(f"--hf: transformers' model does not match ours (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
    if cfg.tie_word_embeddings:
        hf.get_output_embeddings().weight = hf.get_input_embeddings().weight
    return hf.to(model.device).eval()


def measure_hf(hf, model: Transformer, context: int, batch: int, decode_tokens: int, warmup: int, reps: int,
               timer_dev: torch.device, peak: PeakMemory, gen: torch.Generator) -> Row:
    """One greedy generate of 1 + decode_tokens new tokens per rep; a logits processor stamps the time
    (after a synchronize on GPUs) each time a forward has produced logits: the first stamp ends the
    prefill, the rest are decode steps (generate's own per-step overhead included)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        def __init__(self) -> None:
            self.t: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if timer_dev.type == "cuda":
                torch.cuda.synchronize(timer_dev)
            self.t.append(time.perf_counter())
            return scores

    cfg = model.config
    row = Row(HF_KIND, "transformers", context, batch)
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device=model.device, generator=gen)
    mask = torch.ones_like(ids)
    n = 1 + decode_tokens

    def run() -> tuple[float, float]:
        stamps = Stamps()
        if timer_dev.type == "cuda":
            torch.cuda.synchronize(timer_dev)
        t0 = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0, eos_token_id=None, use_cache=True,
                    logits_processor=LogitsProcessorList([stamps]))
        t = stamps.t
        if len(t) != n:
            raise RuntimeError(f"transformers' generate made {len(t)} steps, expected {n}")
        return t[0] - t0, (t[-1] - t[0]) / decode_tokens * 1e3

    peak.start()
    with torch.inference_mode():
        for _ in range(warmup):
            run()
        pre, dec = [], []
        for _ in range(reps):
            p, d = run()
            pre.append(p)
            dec.append(d)
    row.peak_bytes = peak.stop()
    row.prefill_s = statistics.median(pre)
    row.prefill_tok_s = batch * context / row.prefill_s if row.prefill_s > 0 else None
    time_decode(row, dec)
    bpt = kv_bytes_per_token(cfg, elem_bytes(model.dtype))  # its dynamic cache, in the model dtype
    row.bytes_per_token = row.plan_bytes_per_token = float(bpt)
    row.cache_bytes = CacheBytes(payload=bpt * context * batch).as_dict()
    return row


def check_hf_matches(hf, model: Transformer) -> str | None:
    """Compare last-position logits of a short prompt (check before timing); a note when they differ."""
    ids = torch.arange(1, 17, device=model.device)[None] % model.config.vocab_size
    with torch.inference_mode():
        ours = model(ids)[:, -1].float()
        theirs = hf(input_ids=ids).logits[:, -1].float()
    err = float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-6))
    tol = 1e-3 if model.dtype == torch.float32 else 5e-2
    if err <= tol:
        return None
    return f"--hf: transformers' logits differ from ours (max relative error {err:.2e})"

"""XQuant's Triton kernels, each beside its pure-torch ``*_ref`` reference (the specification and CPU path).

The public ops are exported here but loaded lazily, on first attribute access: importing
``xqcli.kernels`` (which every ``xqcli.kernels.*`` import does first) stays free of Triton, and
Triton's jit decorators run only when a kernel module is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xqcli.kernels.decode_ops import (
        add_rms_norm,
        add_rms_norm_ref,
        rms_norm,
        rms_norm_ref,
        silu_mul,
        silu_mul_ref,
    )
    from xqcli.kernels.kivi_attention import kivi_attention, kivi_attention_ref
    from xqcli.kernels.kv_attention import kv_append_rope, kv_append_rope_ref, kv_attention, kv_attention_ref
    from xqcli.kernels.packed import PackedStream, PagedStream, PageFormat
    from xqcli.kernels.quant import (
        QTensor,
        QuantSpec,
        dequantize,
        dequantize_ref,
        fake_quantize,
        packed_width,
        quantize,
        quantize_ref,
    )
    from xqcli.kernels.rope_q import rope_q, rope_q_ref
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
    from xqcli.kernels.xquant_attention import xquant_attention, xquant_attention_ref
    from xqcli.kernels.xquant_cl import (
        xquant_cl_attention,
        xquant_cl_attention_ref,
        xquant_cl_project,
        xquant_cl_project_ref,
        xquant_cl_update,
        xquant_cl_update_ref,
    )

_EXPORTS = {
    "quant": ("QTensor", "QuantSpec", "dequantize", "dequantize_ref", "fake_quantize", "packed_width", "quantize",
              "quantize_ref"),
    "packed": ("PackedStream", "PagedStream", "PageFormat"),
    "stream_append": ("StreamBuffers", "allocate_stream", "ring_capacity", "ring_view", "sealed_count", "stream_append",
                      "stream_append_ref", "stream_values_ref"),
    "xquant_attention": ("xquant_attention", "xquant_attention_ref"),
    "kivi_attention": ("kivi_attention", "kivi_attention_ref"),
    "kv_attention": ("kv_append_rope", "kv_append_rope_ref", "kv_attention", "kv_attention_ref"),
    "xquant_cl": ("xquant_cl_attention", "xquant_cl_attention_ref", "xquant_cl_project", "xquant_cl_project_ref",
                  "xquant_cl_update", "xquant_cl_update_ref"),
    "rope_q": ("rope_q", "rope_q_ref"),
    "decode_ops": ("add_rms_norm", "add_rms_norm_ref", "rms_norm", "rms_norm_ref", "silu_mul", "silu_mul_ref"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

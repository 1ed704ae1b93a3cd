"""xq's vLLM plugin: serve an xq bundle (or HF Llama folder) through vLLM with an X cache (docs/vllm.md).

`register` is the `vllm.general_plugins` entry point; vLLM calls it in every process it starts. It registers
the attention backend name and the `XqLlamaForCausalLM` architecture; nothing vLLM-specific is imported by
the rest of xq, and this package imports vLLM only when vLLM calls it.
"""

from __future__ import annotations

ARCHITECTURE = "XqLlamaForCausalLM"


def register() -> None:
    """Register the X-cache attention backend and `XqLlamaForCausalLM` with vLLM (idempotent)."""
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from xqcli.vllm_plugin.backend import BACKEND_NAME

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, "xqcli.vllm_plugin.backend.XQuantBackend")
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "xqcli.vllm_plugin.model:XqLlamaForCausalLM")

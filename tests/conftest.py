"""Test setup: offline hub, Triton in interpreter mode on CPU, deterministic seeds, shared model fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Spinning OpenMP threads make a busy 2-core machine several times slower (SVDs: 5 s instead of 0.02 s).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_dir():
    import assets

    return assets.smollm2_hf()


@pytest.fixture(scope="session")
def smollm2_mha_dir():
    import assets

    return assets.smollm2_mha_hf()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from xqcli.load import load_hf_folder

    return load_hf_folder(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_mha(smollm2_mha_dir):
    from xqcli.load import load_hf_folder

    return load_hf_folder(smollm2_mha_dir)


@pytest.fixture(scope="session")
def tiny_models():
    """{kind: loaded Transformer} for the tiny random llama/mistral/qwen2/mha folders (these cache X: 2·d_kv >= d),
    and "latent": the qwen2 with one KV head, narrow enough for the SVD latents X·U_k, X·U_v (and so +ch0)."""
    import assets

    from xqcli.config import ModelConfig
    from xqcli.load import build_model, load_hf_folder

    models = {k: load_hf_folder(assets.tiny_hf(k)) for k in ("llama", "mistral", "qwen2", "mha")}
    cfg = assets.tiny_config("qwen2") | {"num_key_value_heads": 1}
    return models | {"latent": build_model(ModelConfig.from_dict(cfg), assets.tiny_tensors(cfg, 5))}

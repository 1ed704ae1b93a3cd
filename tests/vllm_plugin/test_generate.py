"""Greedy text through vLLM with the X cache against vLLM's own Llama and `xq generate` (docs/vllm.md).

Each engine runs in its own process (`vllm_generate.py`); runs are shared within the module (~1 min each).
`xq generate` runs with `--window 0`: the plugin keeps no full-precision window (docs/vllm.md).
"""

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from pydoc_data.topics import topics

import assets
import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
# A short prompt, and two long ones whose per-channel pages seal (260 and 170 tokens, pages of 128).
PROMPTS = ("The capital of France is", topics["assert"][:1500], topics["while"][:900])
MAX_TOKENS = 16  # as in vllm_generate.py


@cache
def vllm_run(model: str, cache_kind: str) -> tuple[list[str], int]:
    """(completions of PROMPTS in one batch, the cache capacity in tokens vLLM logged at startup)."""
    folder = str(assets.smollm2_hf() if model == "gqa" else assets.smollm2_mha_hf())
    r = subprocess.run([sys.executable, str(HERE / "vllm_generate.py"), folder, cache_kind, json.dumps(PROMPTS)],
                       capture_output=True, text=True, timeout=900, check=False)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    texts = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("XQ-RESULT "))[10:])
    capacity = int(re.search(r"KV cache size: ([\d,]+) tokens", log).group(1).replace(",", ""))
    return texts, capacity


@cache
def xq_generate(model: str, cache_kind: str) -> list[str]:
    folder = str(assets.smollm2_hf() if model == "gqa" else assets.smollm2_mha_hf())
    texts = []
    for prompt in PROMPTS:
        r = subprocess.run([sys.executable, "-m", "xqcli", "generate", folder, "-p", "-", "-n", str(MAX_TOKENS),
                            "-c", cache_kind, "--window", "0", "--json"],
                           input=prompt, capture_output=True, text=True, timeout=900, check=False)
        assert r.returncode == 0, r.stderr[-4000:]
        texts.append(json.loads(r.stdout)["text"])
    return texts


def test_xquant_fp_equals_vllm() -> None:
    """Quantization off, the rebuilt K and V are vLLM's own (up to float rounding): the same greedy text."""
    assert vllm_run("gqa", "xquant-fp")[0] == vllm_run("gqa", "vllm")[0]


@pytest.mark.parametrize("model", ["gqa", "mha"])
def test_xquant_8_equals_xq_generate(model: str) -> None:
    assert vllm_run(model, "xquant-8")[0] == xq_generate(model, "xquant-8")


def test_xquant_4_capacity_is_over_3_5x_fp16_kv() -> None:
    """vLLM's own startup accounting, same cache memory: fp32 KV holds half the tokens fp16 KV would."""
    fp16_kv_tokens = 2 * vllm_run("gqa", "vllm")[1]
    texts, tokens = vllm_run("gqa", "xquant-4")
    assert tokens >= 3.5 * fp16_kv_tokens
    assert texts[0].startswith(" Paris.")

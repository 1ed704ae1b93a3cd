#!/usr/bin/env bash
# Reproduce the perplexity tables of BENCHMARKS.md (CPU, fp32). Writes JSON into ${OUT:-out}/.
# Needs the test assets (./scripts/test.sh builds them into ~/.cache/xq-test).
set -euo pipefail
# Oversubscribed cores: spinning OpenMP threads slow everything else down (5x seen on 2 shared cores).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
OUT="${OUT:-out}"; mkdir -p "$OUT"
XQ="${XQ:-.venv/bin/xq}"
CACHE="${XQ_TEST_CACHE:-$HOME/.cache/xq-test}"
GQA="$CACHE/smollm2-135m-instruct-f32-v1"
MHA="$CACHE/smollm2-135m-instruct-mha-f32-v1"
PAPER="kv,kivi-4,kivi-3,kivi-2,xquant-8,xquant-4,xquant-3,xquant-2,xquant-cl-4,xquant-cl-3,xquant-cl-2"
for m in GQA MHA; do
  "$XQ" eval "${!m}" --text wiki --seq-len 2048 --max-tokens 18432 --methods "$PAPER" --json > "$OUT/eval-$m-paper.json"
done
for m in GQA MHA; do
  "$XQ" eval "${!m}" --text wiki --protocol decode --seq-len 512 --max-tokens 2048 --methods kv,xquant-4,xquant-cl-3 \
    --json > "$OUT/eval-$m-decode.json"
done

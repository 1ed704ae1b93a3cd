#!/usr/bin/env bash
# Reproduce the perplexity tables of BENCHMARKS.md (CPU, fp32). Writes JSON into ${OUT:-out}/.
# Needs the test assets (./scripts/test.sh builds them into ~/.cache/xq-test).
source "$(dirname "$0")/_eval_env.sh"
ASSETS="${XQ_TEST_CACHE:-$HOME/.cache/xq-test}/smollm2-135m-instruct"
GQA="$ASSETS-f32-v1" MHA="$ASSETS-mha-f32-v1"
PAPER="kv,kivi-4,kivi-3,kivi-2,xquant-8,xquant-4,xquant-3,xquant-2,xquant-cl-4,xquant-cl-3,xquant-cl-2"
eval_models "eval-%-paper" --text wiki --seq-len 2048 --max-tokens 18432 --methods "$PAPER"
eval_models "eval-%-decode" --text wiki --protocol decode --seq-len 512 --max-tokens 2048 \
  --methods kv,xquant-4,xquant-cl-3

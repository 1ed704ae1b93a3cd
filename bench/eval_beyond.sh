#!/usr/bin/env bash
# Reproduce the "beyond the paper" tables of BENCHMARKS.md: +rot rows on SmolLM2 and its MHA variant, on
# the Wikipedia text (rows beside bench/eval_tables.sh's) and on the Lee news text. (Their +mix rows came
# from commit f127e1a; +mix has been removed since, see CHANGELOG.)
# Needs bundles made with: xq convert <folder> -o out/smollm2-xq --dtype float32 (and the MHA variant).
source "$(dirname "$0")/_eval_env.sh"
GQA="${GQA_BUNDLE:-out/smollm2-xq}"
MHA="${MHA_BUNDLE:-out/smollm2-mha-xq}"
NEW="kv,xquant-4+rot,xquant-3+rot,xquant-2+rot,xquant-cl-3+rot,xquant-cl-2+rot"
ALL="kv,kivi-4,kivi-3,kivi-2,xquant-4,xquant-3,xquant-2,xquant-cl-3,xquant-cl-2,${NEW#kv,}"
eval_models "beyond-%-wiki" --text wiki --seq-len 2048 --max-tokens 18432 --methods "$NEW"
eval_models "beyond-%-news" --text news --seq-len 2048 --max-tokens 4096 --methods "$ALL"

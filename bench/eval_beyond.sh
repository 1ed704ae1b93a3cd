#!/usr/bin/env bash
# Reproduce the "beyond the paper" tables of BENCHMARKS.md: +rot and +mix rows on SmolLM2 and its MHA
# variant, on the Wikipedia text (rows beside bench/eval_tables.sh's) and on the Lee news text.
# Needs bundles made with: xq convert <folder> -o out/smollm2-xq --dtype float32 (and the MHA variant).
set -euo pipefail
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
OUT="${OUT:-out}"; mkdir -p "$OUT"
XQ="${XQ:-.venv/bin/xq}"
GQA="${GQA_BUNDLE:-out/smollm2-xq}"
MHA="${MHA_BUNDLE:-out/smollm2-mha-xq}"
NEW="kv,xquant-4+rot,xquant-3+rot,xquant-2+rot,xquant-cl-3+rot,xquant-cl-2+rot,xquant-3+mix,xquant-2.5+mix"
ALL="kv,kivi-4,kivi-3,kivi-2,xquant-4,xquant-3,xquant-2,xquant-cl-3,xquant-cl-2,${NEW#kv,}"
for m in MHA GQA; do
  "$XQ" eval "${!m}" --text wiki --seq-len 2048 --max-tokens 18432 --methods "$NEW" --json > "$OUT/beyond-$m-wiki.json"
done
for m in MHA GQA; do
  "$XQ" eval "${!m}" --text news --seq-len 2048 --max-tokens 4096 --methods "$ALL" --json > "$OUT/beyond-$m-news.json"
done
# Calibrated bits per layer on rotated X (MHA variant).
"$XQ" eval "$MHA" --text wiki --seq-len 2048 --max-tokens 18432 --methods kv,xquant-3+mix+rot,xquant-2.5+mix+rot \
  --json > "$OUT/beyond-MHA-wiki-mixrot.json"

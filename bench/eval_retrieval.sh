#!/usr/bin/env bash
# BENCHMARKS.md "Retrieval and lm-eval": passkey retrieval and two local multiple-choice lm-eval tasks for
# SmolLM2-135M (GQA and its MHA variant) through the eight cache kinds of issue 17. CPU, fp32. Writes JSON
# into ${OUT:-out}/ (render with bench/retrieval_table.py); needs the test assets and the lmeval extra.
#   bench/eval_retrieval.sh [passkey|lmeval|all] [GQA|MHA|both]    (default: all both)
# Sized for 2 shared CPU cores: 1k and 2k tokens, depths 0.2 and 0.7, one sample per cell. The issue's grid
# is PASSKEY_LENGTHS=1k,2k,4k,8k PASSKEY_DEPTHS=0,0.25,0.5,0.75 (hours on a CPU; minutes on a GPU).
source "$(dirname "$0")/_eval_env.sh"
ASSETS="${XQ_TEST_CACHE:-$HOME/.cache/xq-test}/smollm2-135m-instruct"
GQA="$ASSETS-f32-v1" MHA="$ASSETS-mha-f32-v1"
KINDS="kv,kivi-4,kivi-2,xquant-4,xquant-3+rot,xquant-2+rot,xquant-cl-3,xquant-cl-2+rot"
WHAT="${1:-all}" MODELS="${2:-both}"
[ "$MODELS" = both ] && MODELS="GQA MHA"
TASKS_DIR="$OUT/lmeval-tasks"
PYTHONPATH=tests .venv/bin/python -c "import lmeval_tasks, sys; lmeval_tasks.write_tasks(sys.argv[1])" "$TASKS_DIR"
for m in $MODELS; do
  if [ "$WHAT" != lmeval ]; then
    "$XQ" eval "${!m}" --task passkey --text "${PASSKEY_TEXT:-wiki}" --lengths "${PASSKEY_LENGTHS:-1k,2k}" \
      --depths "${PASSKEY_DEPTHS:-0.2,0.7}" --samples "${PASSKEY_SAMPLES:-1}" --batch-size 4 --methods "$KINDS" \
      --json > "$OUT/passkey-$m.json"
  fi
  if [ "$WHAT" != passkey ]; then
    HF_DATASETS_OFFLINE=1 "$XQ" eval "${!m}" --tasks xq_capitals,xq_opposites --include "$TASKS_DIR" \
      --batch-size 16 --methods "$KINDS" --json > "$OUT/lmeval-$m.json"
  fi
done

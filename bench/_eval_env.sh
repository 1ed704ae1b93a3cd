# Sourced by the eval table scripts: strict mode, where the JSON goes ($OUT) and which xq runs ($XQ).
set -euo pipefail
# Oversubscribed cores: spinning OpenMP threads slow everything else down (5x seen on 2 shared cores).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
OUT="${OUT:-out}"; mkdir -p "$OUT"
XQ="${XQ:-.venv/bin/xq}"

# eval_models "NAME-%-SUFFIX" ARGS...: `xq eval ARGS --json` of the GQA then the MHA model ($GQA, $MHA, set by
# the script), each into $OUT/NAME-GQA-SUFFIX.json, $OUT/NAME-MHA-SUFFIX.json.
eval_models() {
  local pattern=$1 m; shift
  for m in GQA MHA; do
    "$XQ" eval "${!m}" "$@" --json > "$OUT/${pattern//%/$m}.json"
  done
}

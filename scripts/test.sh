#!/usr/bin/env bash
# Set up .venv with the test extra and the offline test assets, then run the whole suite.
set -euo pipefail
# Oversubscribed cores: spinning OpenMP threads slow everything else down (5x seen on 2 shared cores).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
echo "xq: installing xqcli[test]" >&2
"${PIP[@]}" -e ".[test]"
"${PIP[@]}" --no-deps --require-hashes -r scripts/test-assets.txt
export HF_HUB_OFFLINE=1
exec "$VPY" -m pytest "$@"

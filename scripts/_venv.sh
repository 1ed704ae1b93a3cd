# Sourced by demo.sh and test.sh: make .venv and install CPU torch first when no torch is present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XQ_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "xq: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --disable-pip-version-check -q)
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    # A pinned torch takes the CPU build on disk; an unpinned one would pull a multi-GB CUDA build.
    echo "xq: installing torch==2.13.0" >&2
    "${PIP[@]}" "torch==2.13.0"
fi

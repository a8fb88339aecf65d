#!/usr/bin/env bash
# Create (or reuse) the OpenRLHF 0.11.2 environment and run the OpenRLHF tests in it.
#
# A venv over the main environment (--system-site-packages: torch 2.13.0+cpu, transformers,
# deepspeed, hft-plugin as installed there) plus openrlhf and the few packages its strategy module
# imports, all with --no-deps so nothing of the main environment is replaced.
#
#   bash .ci/openrlhf.sh              # build if needed, run tests/test_openrlhf*.py
#   bash .ci/openrlhf.sh --setup-only
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HFT_ORLHF_VENV:-$HOME/.cache/hft-plugin/venv-openrlhf-0.11.2}"
PY_BASE="${PYTHON:-python}"
REQ="$ROOT/requirements/openrlhf-0.11.2.txt"
STAMP="$VENV/.hft-stamp"
want="$( (cat "$REQ"; "$PY_BASE" -c 'import sys; print(sys.prefix)') | sha256sum | cut -c1-16)"

if [[ ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
    echo "openrlhf env: building $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY_BASE" -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$REQ"
    echo "$want" > "$STAMP"
fi
if ! "$VENV/bin/python" -c "import hft_plugin, sys; sys.exit(not hft_plugin.__file__.startswith('$ROOT/'))" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$ROOT"
fi
if [[ "${1:-}" == "--setup-only" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests/test_openrlhf*.py -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Create (or reuse) the OpenRLHF 0.11.2 environment and run the OpenRLHF tests in it.
#
# A venv layered over the environment of $PYTHON (default: the `python` on PATH, e.g. CI's
# activated venv): a .pth line adds that environment's site-packages (and runs its .pth files, so
# its hft-plugin install and start-up hook apply). On top: openrlhf and the few packages its strategy
# module imports, all with --no-deps, so nothing of the base environment is replaced.
#
#   bash .ci/openrlhf.sh              # build if needed, run tests/test_openrlhf*.py
#   bash .ci/openrlhf.sh --setup-only
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HFT_ORLHF_VENV:-$HOME/.cache/hft-plugin/venv-openrlhf-0.11.2}"
PY_BASE="${PYTHON:-python}"
REQ="$ROOT/requirements/openrlhf-0.11.2.txt"
STAMP="$VENV/.hft-stamp"
BASE_SITE="$("$PY_BASE" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
want="$( (cat "$REQ"; echo "$BASE_SITE") | sha256sum | cut -c1-16)"

if [[ ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
    echo "openrlhf env: building $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY_BASE" -m venv --without-pip "$VENV"
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "import site; site.addsitedir('$BASE_SITE')" > "$site/_hft_base_environment.pth"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$REQ"
    echo "$want" > "$STAMP"
fi
if ! "$VENV/bin/python" -P -c "import hft_plugin, sys; sys.exit(not hft_plugin.__file__.startswith('$ROOT/'))" 2>/dev/null; then
    echo "openrlhf env: hft_plugin is not installed from $ROOT in the base environment ($BASE_SITE): pip install -e ." >&2
    exit 1
fi
if [[ "${1:-}" == "--setup-only" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests/test_openrlhf*.py -q -p no:cacheprovider "$@"

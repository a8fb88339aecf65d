#!/usr/bin/env bash
# Create (or reuse) the Axolotl 0.19.0 environment and run the Axolotl tests in it.
#
# Axolotl pins transformers 5.16.1, TRL 1.9.0 and accelerate 1.13.0, so it gets its own venv.
# torch stays the CPU 2.13.0 build: every install runs under requirements/cpu-torch.txt as a
# constraint, and axolotl itself is installed with --no-deps (its 58 declared dependencies
# include xformers, liger-kernel, torchao, flash-linear-attention: CUDA kernels `axolotl train`
# does not import on CPU). No module is stood in. The venv is reused when its stamp matches the
# requirement files.
#
#   bash .ci/axolotl.sh              # build if needed, run tests/test_axolotl*.py
#   bash .ci/axolotl.sh --setup-only # build if needed, print the venv's python
#   HFT_AXOLOTL_VENV=/path bash .ci/axolotl.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HFT_AXOLOTL_VENV:-$HOME/.cache/hft-plugin/venv-axolotl-0.19.0}"
PY_BASE="${PYTHON:-python3.11}"
command -v "$PY_BASE" >/dev/null || PY_BASE=python3
REQ="$ROOT/requirements/axolotl-0.19.0.txt"
CON="$ROOT/requirements/cpu-torch.txt"
STAMP="$VENV/.hft-stamp"
want="$(cat "$REQ" "$CON" | sha256sum | cut -c1-16)"

if [[ ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
    echo "axolotl env: building $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY_BASE" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${PIP[@]}" -c "$CON" torch==2.13.0
    "${PIP[@]}" -c "$CON" -r "$REQ"
    "${PIP[@]}" --no-deps axolotl==0.19.0
    # The plugin itself, editable, without touching the pinned packages above.
    "${PIP[@]}" --no-deps -e "$ROOT"
    torch_version="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    if [[ "$torch_version" != 2.13.0+cpu ]]; then
        echo "axolotl env: torch is $torch_version, expected 2.13.0+cpu" >&2
        exit 1
    fi
    if "$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -i '^nvidia-'; then
        echo "axolotl env: CUDA packages were installed (above)" >&2
        exit 1
    fi
    echo "$want" > "$STAMP"
else
    # Reused venv: make sure the editable install points at this checkout (CI clones elsewhere)
    # and that its copy of the start-up .pth is this checkout's.
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if ! "$VENV/bin/python" -c "import hft_plugin, sys; sys.exit(not hft_plugin.__file__.startswith('$ROOT/'))" 2>/dev/null \
        || ! cmp -s "$site/hft-plugin.pth" "$ROOT/hft_plugin/bootstrap/hft-plugin.pth"; then
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$ROOT"
    fi
fi

if [[ "${1:-}" == "--setup-only" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi
cd "$ROOT"
export PATH="$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest tests/test_axolotl*.py -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Create (or reuse) the LLaMA-Factory 0.9.5 environment and run the LLaMA-Factory tests in it.
#
# LLaMA-Factory pins transformers<=5.6 and trl<=0.24, so it gets its own venv. torch stays the
# CPU 2.13.0 build: every install runs under requirements/cpu-torch.txt as a constraint, and
# llamafactory itself is installed with --no-deps so its torchaudio/torchvision/gradio pins
# cannot pull a CUDA torch. The venv is reused when its stamp matches the requirement files.
#
#   bash .ci/llamafactory.sh              # build if needed, run tests/test_llamafactory*.py
#   bash .ci/llamafactory.sh --setup-only # build if needed, print the venv's python
#   HFT_LF_VENV=/path bash .ci/llamafactory.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HFT_LF_VENV:-$HOME/.cache/hft-plugin/venv-llamafactory-0.9.5}"
PY_BASE="${PYTHON:-python3.11}"
command -v "$PY_BASE" >/dev/null || PY_BASE=python3
REQ="$ROOT/requirements/llamafactory-0.9.5.txt"
CON="$ROOT/requirements/cpu-torch.txt"
STAMP="$VENV/.hft-stamp"
want="$(cat "$REQ" "$CON" | sha256sum | cut -c1-16)"

if [[ ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
    echo "llamafactory env: building $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY_BASE" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${PIP[@]}" -c "$CON" torch==2.13.0
    "${PIP[@]}" -c "$CON" -r "$REQ"
    "${PIP[@]}" --no-deps llamafactory==0.9.5
    # torchaudio: PyPI has only CUDA builds; LLaMA-Factory imports it at module level and uses it
    # for audio inputs only. A stand-in that refuses audio keeps text training honest.
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$site/torchaudio"
    cat > "$site/torchaudio/__init__.py" <<'PY'
"""Stand-in for torchaudio in hft-plugin's CPU LLaMA-Factory test environment (no CPU wheel on PyPI).
Text training never calls it; loading audio raises."""
__version__ = "0.0.0+hft-stub"


def _refuse(*args, **kwargs):
    raise ImportError("torchaudio is a stand-in in this environment: audio inputs are not supported here.")


load = _refuse


class functional:  # noqa: N801 - mimics the submodule attribute access torchaudio.functional.resample
    resample = staticmethod(_refuse)
PY
    # The plugin itself, editable, without touching the pinned packages above.
    "${PIP[@]}" --no-deps -e "$ROOT"
    torch_version="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    if [[ "$torch_version" != 2.13.0+cpu ]]; then
        echo "llamafactory env: torch is $torch_version, expected 2.13.0+cpu" >&2
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
exec "$VENV/bin/python" -m pytest tests/test_llamafactory*.py -q -p no:cacheprovider "$@"

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
NAME=llamafactory
VENV="${HFT_LF_VENV:-$HOME/.cache/hft-plugin/venv-llamafactory-0.9.5}"
REQ="$(dirname "${BASH_SOURCE[0]}")/../requirements/llamafactory-0.9.5.txt"
TOOL=llamafactory==0.9.5
TESTS="tests/test_llamafactory*.py"

cell_extras() {
    # torchaudio: PyPI has only CUDA builds; LLaMA-Factory imports it at module level and uses it
    # for audio inputs only. A stand-in that refuses audio keeps text training honest.
    mkdir -p "$1/torchaudio"
    cat > "$1/torchaudio/__init__.py" <<'PY'
"""Stand-in for torchaudio in hft-plugin's CPU LLaMA-Factory test environment (no CPU wheel on PyPI).
Text training never calls it; loading audio raises."""
__version__ = "0.0.0+hft-stub"


def _refuse(*args, **kwargs):
    raise ImportError("torchaudio is a stand-in in this environment: audio inputs are not supported here.")


load = _refuse


class functional:  # noqa: N801 - mimics the submodule attribute access torchaudio.functional.resample
    resample = staticmethod(_refuse)
PY
}

# shellcheck source=cell.sh
source "$(dirname "${BASH_SOURCE[0]}")/cell.sh"
cell_main "$@"

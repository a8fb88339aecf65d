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
NAME=axolotl
VENV="${HFT_AXOLOTL_VENV:-$HOME/.cache/hft-plugin/venv-axolotl-0.19.0}"
REQ="$(dirname "${BASH_SOURCE[0]}")/../requirements/axolotl-0.19.0.txt"
TOOL=axolotl==0.19.0
TESTS="tests/test_axolotl*.py"

# shellcheck source=cell.sh
source "$(dirname "${BASH_SOURCE[0]}")/cell.sh"
cell_main "$@"

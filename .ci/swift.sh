#!/usr/bin/env bash
# Create (or reuse) the ms-swift 4.6.0 environment and run the ms-swift tests in it.
#
# ms-swift needs transformers < 5.20 and TRL < 1.0, so it gets its own venv. torch stays the CPU
# 2.13.0 build: every install runs under requirements/cpu-torch.txt as a constraint, and ms-swift
# itself is installed with --no-deps (resolved freely it pulls torch 2.14.1 and CUDA libraries).
# No module is stood in. The venv is reused when its stamp matches the requirement files.
#
#   bash .ci/swift.sh              # build if needed, run tests/test_swift*.py
#   bash .ci/swift.sh --setup-only # build if needed, print the venv's python
#   HFT_SWIFT_VENV=/path bash .ci/swift.sh
set -euo pipefail
NAME=swift
VENV="${HFT_SWIFT_VENV:-$HOME/.cache/hft-plugin/venv-swift-4.6.0}"
REQ="$(dirname "${BASH_SOURCE[0]}")/../requirements/swift-4.6.0.txt"
TOOL=ms-swift==4.6.0
TESTS="tests/test_swift*.py"

# shellcheck source=cell.sh
source "$(dirname "${BASH_SOURCE[0]}")/cell.sh"
cell_main "$@"

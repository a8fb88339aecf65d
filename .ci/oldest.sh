#!/usr/bin/env bash
# Create (or reuse) the oldest cell's environment and run the oldest cell's tests in it.
#
# The oldest versions the package declares, pinned in requirements/oldest.txt: torch at the floor of
# pyproject.toml's `torch>=` and the lower ends of the `trl` extra (transformers, TRL, accelerate,
# datasets). PyPI has no CPU build of an older torch for x86_64 Linux: pip installs the CUDA build
# and its nvidia-* packages (about 7 GB in the venv), which runs on CPU. The venv is cached under
# ~/.cache/hft-plugin/ and reused while its stamp matches requirements/oldest.txt. Before the tests
# the script checks that the torch it runs is the pinned one and that the pin is pyproject's floor.
#
# The tests: the region, exactness, sharing, FSDP2 and verify tests (what the torch floor is set by)
# and the transformers cell's Trainer and activation tests (noxfile.py's TRANSFORMERS_TESTS).
#
#   bash .ci/oldest.sh                        # build if needed, run the oldest cell's tests
#   bash .ci/oldest.sh --setup-only           # build if needed, print the venv's python
#   bash .ci/oldest.sh -k fsdp                # extra pytest arguments go after the test files
#   HFT_OLDEST_VENV=/path bash .ci/oldest.sh
#
# Not part of .ci/run: the venv's first build downloads about 3.5 GB.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HFT_OLDEST_VENV:-$HOME/.cache/hft-plugin/venv-oldest}"
REQ="$root/requirements/oldest.txt"
TESTS=(
    tests/test_mask_regions.py tests/test_regions.py tests/test_exact.py
    tests/test_sharing.py tests/test_sharing_distributed.py tests/test_sharing_trainers.py
    tests/test_fsdp.py tests/test_fsdp_units.py tests/test_verify.py
    tests/test_trainer.py tests/test_adapters_contract.py tests/test_bootstrap.py
    tests/test_bootstrap_startup.py tests/test_cli_e2e.py
)

py_base="${PYTHON:-python3.11}"
command -v "$py_base" >/dev/null || py_base=python3
stamp="$VENV/.hft-stamp"
want="$(sha256sum < "$REQ" | cut -c1-16)"

if [[ ! -x "$VENV/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "oldest env: building $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$py_base" -m venv "$VENV"
    pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${pip[@]}" -r "$REQ"                # torch is pinned there, so nothing else can move it
    "${pip[@]}" --no-deps -e "$root"     # the plugin and its start-up hook (.pth)
    echo "$want" > "$stamp"
else
    # the editable install and its copy of the start-up .pth must be this checkout's (-P: not the
    # current directory's hft_plugin, which a check run from the checkout would find first)
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if ! "$VENV/bin/python" -P -c "import hft_plugin, sys; sys.exit(not hft_plugin.__file__.startswith('$root/'))" 2>/dev/null \
        || ! cmp -s "$site/hft-plugin.pth" "$root/hft_plugin/bootstrap/hft-plugin.pth"; then
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$root"
    fi
fi

# The floor check: requirements/oldest.txt pins torch at pyproject.toml's `torch>=`, and that torch
# is the one installed (a local build of another version would test something else).
"$VENV/bin/python" -P - "$root" <<'EOF'
import pathlib, re, sys, tomllib

import torch
from packaging.version import Version

root = pathlib.Path(sys.argv[1])
deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
floor = next(re.fullmatch(r"torch>=([\d.]+)", d).group(1) for d in deps if d.startswith("torch"))
pin = re.search(r"^torch==([\d.]+)\s*$", (root / "requirements/oldest.txt").read_text(), re.M).group(1)
installed = Version(torch.__version__).base_version
if Version(pin) != Version(floor):
    sys.exit(f"oldest env: requirements/oldest.txt pins torch {pin}, pyproject.toml declares torch>={floor}")
if Version(installed) != Version(pin):
    sys.exit(f"oldest env: torch {torch.__version__} is installed, requirements/oldest.txt pins {pin}")
print(f"oldest env: torch {torch.__version__} (pyproject.toml: torch>={floor})")
EOF
"$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -i -E '^(torch|transformers|trl|accelerate|datasets|tokenizers|safetensors|huggingface.hub)==' \
    | sed 's/^/    /'

if [[ "${1:-}" == "--setup-only" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi
cd "$root"
export PATH="$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest "${TESTS[@]}" -q -p no:cacheprovider "$@"

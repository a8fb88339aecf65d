# The part every tool cell shares (.ci/llamafactory.sh, .ci/axolotl.sh, .ci/swift.sh), sourced by them.
#
# cell_main builds the cell's venv, or reuses it while its stamp matches the requirement files:
# CPU torch 2.13.0 first, everything under requirements/cpu-torch.txt as a constraint, the tool
# itself with --no-deps (resolved freely, each pulls another torch and CUDA libraries), this
# checkout editable. A reused venv is pointed at this checkout (CI clones elsewhere). Then it runs
# the cell's tests, or with --setup-only prints the venv's python.
#
# The caller sets NAME (for messages), VENV, REQ (its requirements file), TOOL (the pip spec of the
# tool) and TESTS (a glob under tests/), and may define cell_extras SITE_PACKAGES_DIR, run after
# the tool is installed.

cell_main() {
    local root con stamp want site
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local py_base="${PYTHON:-python3.11}"
    command -v "$py_base" >/dev/null || py_base=python3
    con="$root/requirements/cpu-torch.txt"
    stamp="$VENV/.hft-stamp"
    want="$(cat "$REQ" "$con" | sha256sum | cut -c1-16)"

    if [[ ! -x "$VENV/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
        echo "$NAME env: building $VENV"
        rm -rf "$VENV"
        mkdir -p "$(dirname "$VENV")"
        "$py_base" -m venv "$VENV"
        local pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
        "${pip[@]}" -c "$con" torch==2.13.0
        "${pip[@]}" -c "$con" -r "$REQ"
        "${pip[@]}" --no-deps "$TOOL"
        site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        if declare -F cell_extras >/dev/null; then
            cell_extras "$site"
        fi
        "${pip[@]}" --no-deps -e "$root"  # the plugin, without touching the pinned packages above
        local torch_version
        torch_version="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
        if [[ "$torch_version" != 2.13.0+cpu ]]; then
            echo "$NAME env: torch is $torch_version, expected 2.13.0+cpu" >&2
            exit 1
        fi
        if "$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -i '^nvidia-'; then
            echo "$NAME env: CUDA packages were installed (above)" >&2
            exit 1
        fi
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

    if [[ "${1:-}" == "--setup-only" ]]; then
        echo "$VENV/bin/python"
        exit 0
    fi
    cd "$root"
    export PATH="$VENV/bin:$PATH"
    # shellcheck disable=SC2086 # TESTS is a glob
    exec "$VENV/bin/python" -m pytest $TESTS -q -p no:cacheprovider "$@"
}

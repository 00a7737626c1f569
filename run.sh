#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine (Python >= 3.10 with venv):
#   ./run.sh demo   edit a generated sample clip: SD 2.1-base (downloaded with progress; offline and not
#                   cached: --model tiny), with settings that finish here (see tokenflow/app/demo.py)
#   ./run.sh test   run the test suite
#   ./run.sh lint   the import-layer contracts (lint-imports) and ruff, as CI runs them
#   ./run.sh setup  only create .venv and install the package
#   ./run.sh torch-command  print the torch install setup would run, and why (installs nothing)
# Extra arguments after `demo` go to `tokenflow edit` (`--dry-run`: only say what it would run);
# after `test`, to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY="${PYTHON:-python3}"
VENV="${TOKENFLOW_VENV:-.venv}"

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.tokenflow-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # torch first, pinned, the build scripts/torch_command.py chooses (./run.sh torch-command
        # prints it and why): TOKENFLOW_TORCH_INDEX, else pip's own index configuration, else
        # PyTorch's CPU wheel index on Linux without an NVIDIA driver, else the default index
        local out torch_args=()
        out="$("$VENV/bin/python" scripts/torch_command.py --args)"
        while IFS= read -r arg; do torch_args+=("$arg"); done <<< "$out"
        "$VENV/bin/python" -m pip install -q "${torch_args[@]}"
        "$VENV/bin/python" -m pip install -q -e ".[test]"
        touch "$stamp"
    fi
}

demo() {
    # tokenflow/app/demo.py: the model (download with progress, or the tiny model offline) and
    # settings that finish on this machine (the real defaults on a GPU, fast and small on a CPU)
    "$VENV/bin/python" -m tokenflow.app.demo "$@"
}

cmd="${1:-demo}"
shift || true
case "$cmd" in
    setup) setup ;;
    torch-command) # what setup's torch install would run, and why (installs nothing)
        if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; fi
        exec "$PY" scripts/torch_command.py "$@" ;;
    demo) setup; demo "$@" ;;
    test) setup; exec "$VENV/bin/python" -m pytest -q --durations=30 "$@" ;;
    lint) setup; "$VENV/bin/lint-imports" --no-cache; exec "$VENV/bin/ruff" check . ;;
    *) echo "usage: ./run.sh [demo|test|lint|setup|torch-command] [args...]" >&2; exit 2 ;;
esac

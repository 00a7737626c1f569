#!/usr/bin/env bash
# bench/gpu_check.py on the GPU machine: installs the carried wheels (.whl/, made by
# scripts/prepare_gpu_wheels.sh) into /tmp/site, unsets TRITON_INTERPRET and runs the check.
# Arguments go to gpu_check.py (e.g. --out "$OUT"); docs/benchmarks.md has the whole `run` call.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY="${PYTHON:-python3}"
SITE="${GPU_SITE:-/tmp/site}"   # where the wheels go (the reference kit installs into /tmp/site too)
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
exec "$PY" bench/gpu_check.py "$@"

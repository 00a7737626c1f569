#!/usr/bin/env bash
# Downloads the wheels the GPU machine's image lacks into the git-ignored folder .whl/ (no install
# here): diffusers (tokenflow's model code), PyAV (video I/O) and importlib_metadata + zipp (diffusers
# imports them). The image already has torch, triton, transformers, huggingface_hub, safetensors,
# pillow, numpy, pyyaml, tqdm, requests (/work/.library/device/KINDS.md). Python 3.12, manylinux x86_64.
#
#   bash scripts/prepare_gpu_wheels.sh [DIR]      # default: <repo>/.whl
#
# On the GPU machine (carry: .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# Env: PIP (default "python3 -m pip"), WHEELS_MAX_MIB (45: a GPU call carries 64 MiB in all).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO/.whl}"
read -r -a PIP <<< "${PIP:-python3 -m pip}"
MAX_MIB="${WHEELS_MAX_MIB:-45}"
# pinned: diffusers inside pyproject's range (<0.43) and the version the reference kit verified
BINARY=(diffusers==0.42.1 av==18.1.0)
# the versions the reference kit (../shared/reference/gpu_kit.sh) pins, so the two never disagree in /tmp/site
PURE=(importlib_metadata==10.2.0 zipp==4.1.2)
case "$DIR" in "$REPO"/*) if ! git -C "$REPO" check-ignore -q "${DIR%/}/"; then
    echo "prepare_gpu_wheels.sh: $DIR is inside the repository but not git-ignored" >&2; exit 1; fi ;; esac
rm -rf "$DIR"
mkdir -p "$DIR"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
"${PIP[@]}" download -q --no-deps "${PLAT[@]}" -d "$DIR" "${BINARY[@]}"
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any -d "$DIR" "${PURE[@]}"
for w in "$DIR"/*; do
    case "$w" in *.whl) ;; *) echo "prepare_gpu_wheels.sh: not a wheel: $w" >&2; exit 1 ;; esac
done
SIZE_KIB=$(du -sk "$DIR" | cut -f1)
ls -la "$DIR"
echo "wheels: $DIR ($((SIZE_KIB / 1024)) MiB)"
if [ "$SIZE_KIB" -gt $((MAX_MIB * 1024)) ]; then
    echo "prepare_gpu_wheels.sh: $DIR is larger than $MAX_MIB MiB (a GPU call carries 64 MiB in all)" >&2; exit 1
fi

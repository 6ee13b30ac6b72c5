#!/usr/bin/env bash
# Fill a wheel folder for scripts/gpu_check.sh on an air-gapped GPU node (no network there). Run it on a machine
# with PyPI and a Python that has torch (any build: deepspeed's wheel is built from its source, ops not compiled):
#
#   scripts/gpu_wheels.sh DIR             # then carry DIR to the node: bash scripts/gpu_check.sh --wheels DIR
#
# The packages and their exact versions are scripts/gpu_wheels.txt. Binary wheels are for the node's Python
# (PYTHON_VERSION, default 3.12) on x86-64 Linux (manylinux); every download is --no-deps, so the list is the
# whole of what travels. Prints the folder's size (the check's carried files must stay small: about 60 MB).
set -euo pipefail
DIR=${1:?usage: scripts/gpu_wheels.sh DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
mkdir -p "$DIR"
while read -r spec kind; do
    [[ -z $spec || $spec == \#* ]] && continue
    if [[ ${kind:-} == sdist ]]; then  # source only on PyPI: a pure-Python wheel built here, no ops compiled
        DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$spec"
    else
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
            --implementation cp "${PLATFORMS[@]}" -d "$DIR" "$spec"
    fi
done < "$REPO/scripts/gpu_wheels.txt"
ls -1 "$DIR"
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"

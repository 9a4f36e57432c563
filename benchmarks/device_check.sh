#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one device call on the borrowed H100 / H200; with --cpu, the same
# steps, tiny, on this CPU (the dry run CI does).
#
#   1. here, once:   benchmarks/device_payload.sh
#                    (wheels for the image's Python 3.12 and the test data, into benchmarks/device_payload/,
#                    which git ignores and the device call carries; ~17 MB). Again after any change to
#                    python/ or export/: the device runs the wheel, and the preflight refuses one built from
#                    other sources than the checkout it runs in.
#   2. the call:     device tool `run` with
#                      command:   bash benchmarks/device_check.sh "$OUT"
#                      carry:     ["benchmarks/device_payload"]
#                      timeout_s: 600          (the script stops itself at 540 s)
#                    then commit $OUT/device_check.json (and e2e.json, reference.json) under
#                    benchmarks/data/gpu/ and fill RESULTS.md's GPU table from its "summary". A rerun at once,
#                    on the still-warm machine, reuses the bundle in $WORK (~150 s saved): give it the device
#                    time left less a minute, e.g. command: HEXFAST_DEVICE_LIMIT=300 bash benchmarks/device_check.sh "$OUT"
#   3. dry run:      benchmarks/device_payload.sh --host /tmp/payload
#                    HEXFAST_DEVICE_PAYLOAD=/tmp/payload benchmarks/device_check.sh OUT --cpu
#
# Steps (benchmarks/device_check.py), in order of value, each saved to OUT/device_check.json as it ends, with
# an estimate for an H200 (16 CPU cores beside it); the total is about 6.2 minutes:
#   install       pip --target of the payload's wheels into $WORK/site, PYTHONPATH over the image's python3  10 s
#   preflight     cv2, openslide, hexfast._core import; CUDA seen; one bf16 HEX tile on the GPU           20 s
#   export        full-size demo bundle: ONNX fp32, programs fp32 + HEX bf16, parity on the CPU          150 s
#   engine        HEX bf16, batch 64                                                                     15 s
#   engine_sweep  bf16 at 32 and 128, bf16 with CUDA graphs at 64, fp32 (TF32) at 64                     45 s
#   peak          bf16 / TF32 matmul peak                                                                10 s
#   slide         48,000 x 40,000 px 40x slide, ~13k tiles (made in the background since `engine`)        5 s
#   e2e           hexfast bench e2e on it, bf16, 16 stream threads (HEX + MICA, all outputs)             55 s
#   parity        bf16 vs true fp32 on the GPU; fp32 GPU vs CPU; real H&E tiles                          20 s
#   reference     HEX's research path vs hexfast, 1,024 tiles                                            40 s
#
# No venv: the image's python3 is itself one, and a venv made from it sees none of its packages. Heavy files
# (the installed wheels, the 3 GB bundle, the slide) go under $WORK (default /tmp/hexfast-device); OUT gets
# device_check.json, e2e.json, reference.json and log.txt only (the device tool returns small files).
# Environment: HEXFAST_DEVICE_PAYLOAD (default benchmarks/device_payload), HEXFAST_DEVICE_WORK,
# HEXFAST_DEVICE_LIMIT (seconds, default 540: the whole script, install included).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/device_check.sh OUT [--cpu]}
shift
MODE=()
if [ "${1:-}" = "--cpu" ]; then MODE=(--cpu); fi
PAYLOAD=${HEXFAST_DEVICE_PAYLOAD:-benchmarks/device_payload}
WORK=${HEXFAST_DEVICE_WORK:-/tmp/hexfast-device}
LIMIT=${HEXFAST_DEVICE_LIMIT:-540}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/log.txt
log() { echo "$*" | tee -a "$LOG"; }
: > "$LOG"
log "device check $(date -u +%FT%TZ) in $PWD -> $OUT (work: $WORK, limit ${LIMIT} s${MODE[*]:+, ${MODE[*]}})"
command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | tee -a "$LOG"

log "### install: $PAYLOAD/wheels -> $WORK/site (pip --target, no venv)"
if ! ls "$PAYLOAD"/wheels/hexfast-*.whl >/dev/null 2>&1; then
  log "device check: no hexfast wheel in $PAYLOAD/wheels: run benchmarks/device_payload.sh first (and carry it)"
  exit 2
fi
rm -rf "$WORK/site"
if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$WORK/site" "$PAYLOAD"/wheels/*.whl 2>&1 | tee -a "$LOG"; then
  log "device check: installing the wheels failed (above); nothing was measured"
  exit 2
fi
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export HEXFAST_DEVICE_SITE="$WORK/site"
export HEXFAST_SHARED="$PAYLOAD/shared"
export PYTHONUNBUFFERED=1
log "### install: done after $SECONDS s"

# The rest under the limit: on time, device_check.py records the step it was in, saves the JSON and exits 124;
# 20 s later anything left is killed.
timeout --kill-after=20 "$((LIMIT - SECONDS))" python3 benchmarks/device_check.py "$OUT" --work "$WORK" \
  "${MODE[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
log "device check: exit $rc after $SECONDS s"
exit "$rc"

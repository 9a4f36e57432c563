#!/usr/bin/env bash
# The CPU tables of benchmarks/RESULTS.md (issue 6), end to end.
#
#   benchmarks/cpu_bench.sh [OUT_DIR]        (default benchmarks/data/cpu)
#
# Setup: pip install -c constraints.txt '.[test,export,bench,cpu]'   (torch: the pinned CPU wheel)
# Makes two synthetic 40x slides and the full-size demo bundle (random weights, ~2-4 min, ~5 GB
# RAM) under $WORK (default /tmp/hexfast-bench), then runs every row. ~30 min on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/data/cpu}
WORK=${WORK:-/tmp/hexfast-bench}
TEXTURE=${TEXTURE:-../shared/data/slides/CMU-1-Small-Region.svs}
FULL=$WORK/hex-full-demo
MID=$WORK/mid-20000x16000.svs      # 1,973 tissue tiles
SMALL=$WORK/small-4000x3000.svs    # 78 tissue tiles
mkdir -p "$OUT" "$WORK"
LOG=$OUT/log.txt

step() {
  local name=$1; shift
  echo "### $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  echo "### $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$LOG"
}

[ -f "$MID" ] || step slide-mid python benchmarks/make_slide.py --texture "$TEXTURE" --width 20000 --height 16000 -o "$MID"
[ -f "$SMALL" ] || step slide-small python benchmarks/make_slide.py --texture "$TEXTURE" --width 4000 --height 3000 -o "$SMALL"
[ -f "$FULL/manifest.json" ] || step export /usr/bin/time -v hexfast export --demo --size full --mica-features resnet50-trunc -o "$FULL"

# Engine alone: tiny demo (batch 1..64), full size (batch 1..8: ~2.7 CPU-s per tile).
step engine-tiny hexfast bench engine --batch-sizes 1,2,4,8,16,32,64 --seconds 5 --json "$OUT/engine-tiny.json"
step engine-full hexfast bench engine --model "$FULL" --batch-sizes 1,2,4,8 --seconds 1 --json "$OUT/engine-full.json"

# Roofline: formula vs ONNX graph, fp32 GEMM peak, achieved share.
step roofline-tiny hexfast bench roofline --batch-size 8 --seconds 5 --json "$OUT/roofline-tiny.json"
step roofline-full hexfast bench roofline --model "$FULL" --batch-size 4 --seconds 1 --json "$OUT/roofline-full.json"

# End to end through Scorer.
step e2e-tiny hexfast bench e2e "$MID" --json "$OUT/e2e-tiny.json"
step e2e-full hexfast bench e2e "$SMALL" --model "$FULL" --batch-size 8 --seconds 1 --json "$OUT/e2e-full.json"

# The HEX research inference path vs hexfast, same weights, same tiles.
step reference-tiny python benchmarks/reference_hex.py "$MID" --tiles 1024 --json "$OUT/reference-tiny.json"
step reference-full python benchmarks/reference_hex.py "$SMALL" --model "$FULL" --tiles 32 --json "$OUT/reference-full.json"

# Plots (committed beside RESULTS.md).
step plot-throughput python benchmarks/plot_bench.py throughput "$OUT/engine-tiny.json" "$OUT/engine-full.json" \
  -o benchmarks/throughput_cpu.png
step plot-timeline-tiny python benchmarks/plot_bench.py timeline "$OUT/e2e-tiny.json" -o benchmarks/timeline_cpu_tiny.png
step plot-timeline-full python benchmarks/plot_bench.py timeline "$OUT/e2e-full.json" -o benchmarks/timeline_cpu_full.png
echo "done: $OUT"

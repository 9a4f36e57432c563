#!/usr/bin/env bash
# The GPU table of benchmarks/RESULTS.md, end to end, on one NVIDIA GPU.
#
#   benchmarks/gpu_bench.sh [OUT_DIR] [BUNDLE]
#
# Setup (CUDA build of torch first, then the GPU runtimes; never onnxruntime beside onnxruntime-gpu):
#   python3 -m venv .venv && . .venv/bin/activate
#   pip install torch --index-url https://download.pytorch.org/whl/cu126      # the build matching the driver
#   pip install '.[export,bench,gpu,trt]' pytest
#
# Writes OUT_DIR (default gpu-results/) with: env.json + nvidia-smi.txt (device, driver, versions),
# torch.json (fp16/bf16 autocast and weights, CUDA graphs, torch.compile), engines.json (every
# backend x precision that loads, checked against fp32), engine-<precision>.json (hexfast bench
# engine, batch 1..128), roofline.json, e2e.json (a 48k-tile 40x slide through Scorer),
# reference.json (the HEX research path vs hexfast, same tiles), PNG plots, and log.txt with every
# command and its output. A step that fails is logged and the rest go on.
# Time: ~2 min export, ~5-15 min per TensorRT build (three precisions), ~10 min of runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-results}
BUNDLE=${2:-$OUT/hex-full-demo}
SLIDE=$OUT/resection-40x.svs
TEXTURE=${TEXTURE:-../shared/data/slides/CMU-1-Small-Region.svs}
THREADS=${THREADS:-8}
mkdir -p "$OUT"
LOG=$OUT/log.txt

step() {  # step NAME COMMAND...: runs, logs the command and its output, never stops the script
  local name=$1; shift
  echo "### $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "### $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

step env python benchmarks/gpu_bench.py env --json "$OUT/env.json"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"

# 1. The model: full-size HEX (MUSK-L/16 @ 384) with random weights, fp32 + fp16 ONNX.
[ -f "$BUNDLE/manifest.json" ] || step export hexfast export --demo --size full --mica-features resnet50-trunc --fp16 -o "$BUNDLE"
if python -c "import tensorrt" 2>/dev/null; then
  for p in --fp16 --bf16 ""; do
    step "build-engines $p" hexfast build-engines "$BUNDLE" $p --max-batch 128 --tile-sizes 224 \
      --models hex,codex_encoder,mica
  done
fi

# 2. torch variants (no bundle needed: the same demo weights, built in torch).
step torch python benchmarks/gpu_bench.py torch --size full --batch-sizes 32,64,128 --json "$OUT/torch.json"

# 3. The bundle's engines: every backend x precision, timed at batch 64 and checked against fp32.
step engines python benchmarks/gpu_bench.py engines --model "$BUNDLE" --batch-size 64 --json "$OUT/engines.json"
for p in fp16 bf16 fp32; do
  step "bench engine $p" hexfast bench engine --model "$BUNDLE" --backend all --precision $p \
    --batch-sizes 1,8,32,64,128 --seconds 10 --json "$OUT/engine-$p.json"
done

# 4. Roofline: FLOPs per tile (formula = ONNX graph), fp16/bf16/tf32 matmul peak, achieved share.
step roofline hexfast bench roofline --model "$BUNDLE" --precision fp16 --batch-size 64 --seconds 20 \
  --json "$OUT/roofline.json"

# 5. End to end: a 100k x 80k px 40x slide (~48k tissue tiles) through Scorer; stream alone too.
[ -f "$SLIDE" ] || step make-slide python benchmarks/make_slide.py --texture "$TEXTURE" --width 100000 \
  --height 80000 -o "$SLIDE"
step e2e hexfast bench e2e "$SLIDE" --model "$BUNDLE" --precision fp16 --batch-size 64 --threads "$THREADS" \
  --seconds 20 --json "$OUT/e2e.json"
step stream hexfast bench stream "$SLIDE" --tiles 20000 --json "$OUT/stream.json"

# 6. The path users run today (torch eager, fp16 autocast, DataLoader of PIL tiles, batch 128) vs hexfast.
step reference python benchmarks/reference_hex.py "$SLIDE" --model "$BUNDLE" --tiles 4096 --precision fp16 \
  --json "$OUT/reference.json"

# 7. Plots.
step plot-throughput python benchmarks/plot_bench.py throughput "$OUT"/engine-fp16.json "$OUT"/engine-bf16.json \
  "$OUT"/engine-fp32.json -o "$OUT/throughput_gpu.png" --title "HEX engine throughput (full size) — $(
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
step plot-timeline python benchmarks/plot_bench.py timeline "$OUT/e2e.json" -o "$OUT/timeline_gpu.png"
echo "done: $OUT"
